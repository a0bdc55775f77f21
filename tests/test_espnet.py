"""ESPNet: the module tree matches the published state_dicts (strict loading with weights_only), the outputs have
the input's size, and both decoder variants differ exactly where the published weights do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from oodtune.errors import ModelError
from oodtune.models import ESPNET_PREPROCESSING, SegmentationModel, build_model, read_state_dict

#: The published weights, when a data root holding them is around (they are never committed).
SHARED = Path(os.environ.get("OODTUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "espnet"


@pytest.mark.parametrize(("arch", "outputs", "conv_in"), [("espnet-camvid", 12, 31), ("espnet", 20, 36)])
def test_module_tree_and_output_size(arch: str, outputs: int, conv_in: int) -> None:
    model = build_model(arch, outputs).eval()
    state = model.state_dict()
    assert state["conv.conv.weight"].shape == (outputs, conv_in, 3, 3)
    assert state["encoder.level3.7.d16.conv.weight"].shape == (25, 25, 3, 3)
    assert state["combine_l2_l3.1.c1.conv.weight"].shape[1] == 2 * outputs
    assert sum(1 for k in state if not k.endswith("num_batches_tracked")) == 189  # as the published files
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 24, 32))
    assert out.shape == (2, outputs, 24, 32)
    with pytest.raises(ModelError, match="divisible by 8"):
        model(torch.zeros(1, 3, 20, 32))


@pytest.mark.parametrize(("arch", "file", "outputs"), [("espnet-camvid", "espnet_p_2_q_8_camvid.pth", 12),
                                                       ("espnet", "espnet_p_2_q_8_cityscapes.pth", 20)])
def test_published_weights_load_strictly(arch: str, file: str, outputs: int) -> None:
    path = SHARED / file
    if not path.is_file():
        pytest.skip(f"published weights not present ({path})")
    state = read_state_dict(path)  # torch.load(weights_only=True)
    missing, unexpected = build_model(arch, outputs).load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    build_model(arch, outputs).load_state_dict(state)  # strict
    other = "espnet" if arch == "espnet-camvid" else "espnet-camvid"
    with pytest.raises(RuntimeError, match="conv.conv.weight"):
        build_model(other, outputs).load_state_dict(state)
    assert set(ESPNET_PREPROCESSING) == {"espnet", "espnet-camvid"}


def test_segmentation_model_trains_only_its_block_and_keeps_frozen_bn_statistics() -> None:
    torch.manual_seed(0)
    net = SegmentationModel(build_model("espnet-camvid", 12), 11, 1, ("conv", "classifier")).train()
    trainable = {n for n, p in net.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("conv.", "classifier.")) for n in trainable)
    frozen_bn = net.model.encoder.level1.bn
    assert not frozen_bn.training and net.model.conv.bn.training
    before = frozen_bn.running_mean.clone()
    net(torch.randn(2, 3, 24, 32)).sum().backward()
    torch.testing.assert_close(frozen_bn.running_mean, before)
    assert net.model.encoder.level1.conv.weight.grad is None and net.model.classifier.weight.grad is not None
    with pytest.raises(ModelError, match="no module 'head'"):
        SegmentationModel(build_model("espnet", 20), 19, 1, ("head",))
    with pytest.raises(ModelError, match=r"\(B, 13, H, W\)"):
        SegmentationModel(build_model("espnet", 12), 11, 2)(torch.zeros(1, 3, 24, 32))
