"""Your own architecture: ``--arch package.module:factory``, ``oodtune import-model``, and every command on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import offline_env_with_module
from helpers_cli import FAST, fails, ok
from oodtune.models import build_model
from oodtune.models.checkpoint import CheckpointError, load_feature_model, read_state_dict

MODULE = "oodtune_test_usernets"
USER_CODE = '''
    from torch import nn


    class SmallNet(nn.Module):
        """Not an oodtune model: no forward_features, and the last nn.Linear it registers is a projection
        head (as in contrastive pretraining) that forward() does not use, so the classifier must be named."""

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))
            self.projector = nn.Linear(8, 4)

        def forward(self, x):
            return self.classifier(self.body(x))


    def make_net(num_classes):
        return SmallNet(num_classes=num_classes)


    def not_a_model(num_classes):
        return 42


    def no_kwarg():
        return SmallNet()


    class NotModule:
        def __init__(self, num_classes):
            pass
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with offline_env_with_module(tmp_path_factory.mktemp("imported"), MODULE, USER_CODE, train_per_class=10,
                                 test_per_class=4) as e:
        yield e


def refused(*args: Any, match: str) -> None:
    fails(*args, match=match, code=1)


def test_build_model_by_import_path(env: dict[str, Path]) -> None:
    for factory in ("make_net", "SmallNet"):
        net = build_model(f"{MODULE}:{factory}", 7)
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(("spec", "match"), [
    ("oodtune_no_such_module_xyz:make", "PYTHONPATH"),
    (f"{MODULE}:missing", "has no attribute"),
    ("builtins:exec", "not an nn.Module class or a Python function"),
    (f"{MODULE}:NotModule", "not an nn.Module class"),
    (f"{MODULE}:not_a_model", "returned a int"),
    (f"{MODULE}:no_kwarg", "keyword argument num_classes"),
    ("two:colons:here", "not an import path"),
])
def test_bad_import_paths_are_explained(env: dict[str, Path], spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(spec, 10)


def _save_weights(path: Path, num_classes: int = 10, layout: str = "plain") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = build_model(f"{MODULE}:make_net", num_classes).state_dict()
    if layout == "ddp":  # DataParallel/DDP-style keys inside a training-script dict
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    return state


def test_read_state_dict_layouts(tmp_path: Path) -> None:
    plain = _save_weights(tmp_path / "plain.pt")
    _save_weights(tmp_path / "ddp.pt", layout="ddp")
    for name in ("plain.pt", "ddp.pt"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save(build_model("wrn-10-1", 10), tmp_path / "pickled-model.pt")  # a whole pickled module
    with pytest.raises(CheckpointError, match="state_dict"):
        read_state_dict(tmp_path / "pickled-model.pt")


def test_import_then_finetune_evaluate_with_named_head(env: dict[str, Path]) -> None:
    tmp, root = env["tmp"], env["root"]
    weights = tmp / "mine-weights.pt"
    state = _save_weights(weights, layout="ddp")
    mine = tmp / "mine.pt"
    refused("import-model", weights, "--arch", f"{MODULE}:make_net", "--out", mine, "--data-root", root,
            match="the layer that produces the logits")  # the last nn.Linear: the unused projector
    assert not mine.exists()
    res = ok("import-model", weights, "--arch", f"{MODULE}:make_net", "--head", "classifier.2", "--out", mine,
             "--data-root", root, "--device", "cpu")
    assert "test accuracy of the imported model" in res.output
    net, meta = load_feature_model(mine, trust_arch=[f"{MODULE}:make_net"])
    assert meta.arch == f"{MODULE}:make_net" and meta.head == "classifier.2" and meta.stage == "imported"
    assert all(torch.equal(net.model.state_dict()[k], v) for k, v in state.items())
    logits, feats = net(torch.zeros(3, 3, 32, 32))
    assert logits.shape == (3, 10) and feats.shape == (3, 16)  # the input of classifier.2

    trust = ["--trust-arch", f"{MODULE}:make_net"]
    ok("finetune", mine, "--method", "energy-oe", "--outlier-batch-size", "16", "--data-root", root,
       "--out", tmp / "ft", *FAST, *trust)
    tuned, tuned_meta = load_feature_model(tmp / "ft" / "model.pt", trust_arch=[f"{MODULE}:make_net"])
    assert tuned_meta.head == "classifier.2" and tuned(torch.zeros(1, 3, 32, 32))[1].shape == (1, 16)
    res = ok("evaluate", tmp / "ft" / "model.pt", "--score", "energy", "--score", "knn", "--ood", "gaussian",
             "--data-root", root, "--device", "cpu", "--out", tmp / "ft-eval.json", *trust)
    assert "knn" in res.output


def test_import_refuses_bad_input(env: dict[str, Path]) -> None:
    tmp, root = env["tmp"], env["root"]
    wrong_classes = tmp / "five-classes.pt"
    _save_weights(wrong_classes, num_classes=5)
    refused("import-model", wrong_classes, "--arch", f"{MODULE}:make_net", "--head", "classifier.2", "--out",
            tmp / "x.pt", "--data-root", root, match="does not fit")
    assert not (tmp / "x.pt").exists()
    weights = tmp / "ok-weights.pt"
    _save_weights(weights)
    existing = tmp / "existing.pt"
    existing.write_bytes(b"keep me")
    refused("import-model", weights, "--arch", f"{MODULE}:make_net", "--head", "classifier.2", "--out", existing,
            "--data-root", root, match="already exists")
    assert existing.read_bytes() == b"keep me"
    for head, match in [("body.0", "expected the final nn.Linear"),
                        ("classifier.0", "the layer that produces the logits"), ("fc", "has no layer 'fc'")]:
        refused("import-model", weights, "--arch", f"{MODULE}:make_net", "--head", head, "--out", tmp / "y.pt",
                "--data-root", root, match=match)
        assert not (tmp / "y.pt").exists()


def test_pretrain_your_architecture_from_scratch(env: dict[str, Path]) -> None:
    out = env["tmp"] / "pre-mine"
    ok("pretrain", "--arch", f"{MODULE}:SmallNet", "--head", "classifier.2", "--data-root", env["root"], "--out", out,
       *FAST)
    net, meta = load_feature_model(out / "model.pt", trust_arch=[f"{MODULE}:SmallNet"])
    assert meta.arch == f"{MODULE}:SmallNet" and meta.head == "classifier.2" and net.num_classes == 10
