"""Models shaped like torchvision's and timm's, written here (neither package is needed): the classification layer
and the features are found, ``pretrained_cfg`` mean/std are read on import, and every command runs on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures_data import offline_env_with_module
from helpers_cli import ok
from oodtune.data.tensors import CIFAR_MEAN, CIFAR_STD
from oodtune.models import FeatureModel, build_model, load_feature_model, read_meta
from oodtune.models.imported import input_normalisation
from oodtune.scores import build_score

MODULE = "oodtune_test_ecosystem"
CODE = '''
    import torch
    from torch import nn
    import torch.nn.functional as F

    IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


    class TorchvisionResNet(nn.Module):
        """torchvision.models.ResNet's shape: conv stem, stages, avgpool, flatten, ``fc``; no forward_features."""

        def __init__(self, num_classes=1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.layer1(self.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))


    class TimmResNet(nn.Module):
        """timm's ResNet shape: forward_features -> (B, C, H, W) maps, forward_head pools then ``fc``,
        get_classifier / reset_classifier, pretrained_cfg with ImageNet mean/std."""

        def __init__(self, num_classes=1000):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.num_features = 8
            self.fc = nn.Linear(8, num_classes)
            self.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 224, 224)}

        def get_classifier(self):
            return self.fc

        def reset_classifier(self, num_classes):
            self.fc = nn.Linear(self.num_features, num_classes)

        def forward_features(self, x):
            return self.stem(x)

        def forward_head(self, x, pre_logits=False):
            x = x.mean(dim=(2, 3))
            return x if pre_logits else self.fc(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))


    class TimmViT(nn.Module):
        """timm's ViT shape: ``head`` is an nn.Linear, but forward_features returns all tokens (B, N, D) and
        forward_head takes the class token through ``fc_norm``."""

        def __init__(self, num_classes=1000):
            super().__init__()
            self.patch = nn.Conv2d(3, 12, 8, stride=8)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 12))
            self.blocks = nn.Sequential(nn.Linear(12, 12), nn.GELU())
            self.fc_norm = nn.LayerNorm(12)
            self.head = nn.Linear(12, num_classes)
            self.default_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

        def forward_features(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            return self.blocks(torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1))

        def forward_head(self, x, pre_logits=False):
            x = self.fc_norm(x[:, 0])
            return x if pre_logits else self.head(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))


    class NormMlpHead(nn.Module):
        def __init__(self, dim, num_classes):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.fc = nn.Linear(dim, num_classes)

        def forward(self, x):
            return self.fc(self.norm(x.mean(dim=(2, 3))))


    class TimmConvNeXt(nn.Module):
        """timm's ConvNeXt shape: ``head`` is a module whose ``fc`` classifies; an unused distillation head is
        registered after it, so "the last nn.Linear" would be wrong and get_classifier() must win."""

        def __init__(self, num_classes=1000):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU())
            self.head = NormMlpHead(8, num_classes)
            self.head_dist = nn.Linear(8, num_classes)

        def get_classifier(self):
            return self.head.fc

        def forward_features(self, x):
            return self.stem(x)

        def forward_head(self, x):
            return self.head(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))


    def tv_resnet(num_classes):
        return TorchvisionResNet(num_classes=num_classes)


    def timm_resnet(num_classes):
        """The usual way to adapt a timm model: create it, then reset_classifier to the new classes."""
        model = TimmResNet(num_classes=1000)
        model.reset_classifier(num_classes)
        return model
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with offline_env_with_module(tmp_path_factory.mktemp("ecosystem"), MODULE, CODE, train_per_class=10,
                                 test_per_class=4) as e:
        yield e


def _capture_head_input(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, input of ``layer``) of an independent forward pass, by a hook of our own."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[0]


@pytest.mark.parametrize(("factory", "layer"), [("tv_resnet", "fc"), ("timm_resnet", "fc"),
                                                ("TimmViT", "head"), ("TimmConvNeXt", "head.fc")])
def test_features_are_the_classifier_input(env, factory, layer):
    torch.manual_seed(0)
    model = build_model(f"{MODULE}:{factory}", 10).eval()
    net = FeatureModel(model)
    assert net.head is model.get_submodule(layer) and net.num_classes == 10
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats = net(x)
        ref_logits, ref_feats = _capture_head_input(model, net.head, x)
    assert feats.ndim == 2 and torch.equal(feats, ref_feats) and torch.equal(logits, ref_logits)
    weight, bias = net.head_parameters()
    torch.testing.assert_close(logits, feats @ weight.T + bias)


def test_reset_classifier_head_is_the_one_used(env):
    model = build_model(f"{MODULE}:timm_resnet", 10)
    assert model.fc.out_features == 10 and FeatureModel(model).head is model.fc


def test_pretrained_cfg_normalisation_is_read_when_well_formed(env):
    assert input_normalisation(build_model(f"{MODULE}:timm_resnet", 10)) == ((0.485, 0.456, 0.406),
                                                                              (0.229, 0.224, 0.225))
    assert input_normalisation(build_model(f"{MODULE}:TimmViT", 10)) == ((0.5,) * 3, (0.5,) * 3)  # default_cfg
    assert input_normalisation(build_model(f"{MODULE}:tv_resnet", 10)) is None
    odd = nn.Linear(2, 2)
    for cfg in ({"mean": (0.5,), "std": (0.5, 0.5)}, {"mean": "imagenet", "std": (1.0,)}, {"mean": (0.5,)},
                {"mean": (0.5,), "std": (0.0,)}, ["mean"]):
        odd.pretrained_cfg = cfg  # type: ignore[assignment]
        assert input_normalisation(odd) is None, cfg


def _weights(env: dict[str, Path], factory: str) -> Path:
    torch.manual_seed(0)
    path = env["tmp"] / f"{factory}-weights.pt"
    torch.save(build_model(f"{MODULE}:{factory}", 10).state_dict(), path)
    return path


def test_import_timm_style_reads_pretrained_cfg_then_every_head_score_runs(env):
    root, tmp = env["root"], env["tmp"]
    out = tmp / "timm.pt"
    res = ok("import-model", _weights(env, "timm_resnet"), "--arch", f"{MODULE}:timm_resnet", "--out", out,
             "--data-root", root, "--device", "cpu")
    assert "(0.485, 0.456, 0.406)" in res.output  # the normalisation used is printed
    meta = read_meta(out)
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225) and meta.head is None
    mine = tmp / "timm-own-mean.pt"
    ok("import-model", _weights(env, "timm_resnet"), "--arch", f"{MODULE}:timm_resnet", "--out", mine,
       "--mean", "0.1", "0.2", "0.3", "--data-root", root, "--no-check-accuracy")
    assert read_meta(mine).mean == (0.1, 0.2, 0.3) and read_meta(mine).std == (0.229, 0.224, 0.225)
    res = ok("evaluate", out, "--score", "vim", "--score", "react+energy", "--score", "dice+energy", "--ood",
             "gaussian", "--trust-arch", f"{MODULE}:timm_resnet", "--data-root", root, "--device", "cpu")
    assert "vim" in res.output and "react+energy" in res.output


def test_import_torchvision_style_uses_fc_and_cifar_normalisation(env):
    root, tmp = env["root"], env["tmp"]
    out = tmp / "tv.pt"
    ok("import-model", _weights(env, "tv_resnet"), "--arch", f"{MODULE}:tv_resnet", "--out", out, "--data-root",
       root, "--device", "cpu")
    net, meta = load_feature_model(out, trust_arch=[f"{MODULE}:tv_resnet"])
    assert net.head is net.model.fc and meta.mean == CIFAR_MEAN and meta.std == CIFAR_STD
    score = build_score("ash-b+energy").use_head(*net.head_parameters())
    with torch.no_grad():
        assert torch.isfinite(score.from_outputs(*net(torch.zeros(2, 3, 32, 32)))).all()
