"""A 224-pixel user model through every command: a torchvision-shaped ResNet-50 (2048-d features; written here,
torchvision is not needed) imported with its ImageNet normalisation and weights kept, fine-tuned with every method,
scored with every score, calibrated, exported and used to predict -- on a small folder of 224-px JPEGs, with every
data set read from disk (``OODTUNE_IN_MEMORY_MB=0``: the out-of-core path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fixtures_data import offline_env_with_module, write_image
from helpers_cli import ok
from oodtune.data import load_dataset
from oodtune.data.diskimages import DiskImages
from oodtune.deploy.export import load_exported
from oodtune.models import load_feature_model, read_meta
from oodtune.scores import SCORE_NAMES

MODULE = "oodtune_test_resnet50"
CODE = '''
    import torch
    from torch import nn


    class Bottleneck(nn.Module):
        """torchvision's Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4 channels), BN after each, projection shortcut."""

        expansion = 4

        def __init__(self, inplanes, planes, stride=1, width=8):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + self.downsample(x))


    class ResNet50(nn.Module):
        """torchvision.models.resnet50's layout and widths out of each stage (256, 512, 1024, 2048), one narrow
        bottleneck per stage: 7x7/2 stem, max-pool, layer1-4, avgpool, ``fc`` on 2048-d features."""

        def __init__(self, num_classes=1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = Bottleneck(16, 64)
            self.layer2 = Bottleneck(256, 128, 2)
            self.layer3 = Bottleneck(512, 256, 2)
            self.layer4 = Bottleneck(1024, 512, 2, width=16)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(2048, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))


    def resnet50(num_classes):
        return ResNet50(num_classes=num_classes)
'''
pytestmark = pytest.mark.e2e  # real CLI runs at 224 px

ARCH = f"{MODULE}:resnet50"
TRUST = ["--trust-arch", ARCH]
RES = ["--device", "cpu"]
IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METHODS = ("oe", "energy-oe", "balanced-energy", "sparsity", "balanced-energy+sparsity")


def _jpegs(folder: Path, count: int, seed: int, size: tuple[int, int] = (260, 240)) -> None:
    for i in range(count):
        write_image(folder / f"{i:03d}.jpg", size, seed=seed + i)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("large-images")
    with offline_env_with_module(tmp, MODULE, CODE, train_per_class=5, test_per_class=1) as e, \
            pytest.MonkeyPatch.context() as mp:
        mp.setenv("OODTUNE_IN_MEMORY_MB", "0")  # every set is read from disk, a batch at a time
        photos = tmp / "photos"
        for c, name in enumerate(("cat", "dog", "fox")):
            _jpegs(photos / "train" / name, 20, seed=100 * c)  # kNN (k=50) needs 50 train images
            _jpegs(photos / "test" / name, 4, seed=100 * c + 50)
            _jpegs(photos / "val" / name, 14, seed=100 * c + 70)  # calibration at TPR 0.75 needs 40
        _jpegs(tmp / "outliers", 24, seed=1000, size=(300, 224))
        _jpegs(tmp / "ood-a", 12, seed=2000)
        _jpegs(tmp / "ood-b", 12, seed=3000, size=(224, 224))
        torch.manual_seed(0)
        from oodtune.models import build_model

        model = build_model(ARCH, 3)
        for m in model.modules():  # "pretrained" BatchNorm statistics, to check that they are kept
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        torch.save(model.state_dict(), tmp / "weights.pt")
        e["photos"], e["weights"] = photos, tmp / "weights.pt"
        yield e


@pytest.fixture(scope="module")
def imported(env: dict[str, Path]) -> Path:
    out = env["tmp"] / "imported.pt"
    ok("import-model", env["weights"], "--arch", ARCH, "--dataset", f"folder:{env['photos']}", "--resolution", "224",
       "--mean", *map(str, IMAGENET[0]), "--std", *map(str, IMAGENET[1]), "--out", out, "--data-root", env["root"],
       *RES)
    return out


def test_import_keeps_weights_normalisation_and_reads_from_disk(env: dict[str, Path], imported: Path) -> None:
    meta = read_meta(imported)
    assert meta.resolution == 224 and (meta.mean, meta.std) == IMAGENET and meta.num_classes == 3
    net, _ = load_feature_model(imported, trust_arch=[ARCH])
    state = torch.load(env["weights"], weights_only=True)
    assert all(torch.equal(net.model.state_dict()[k], v) for k, v in state.items())  # BN statistics included
    with torch.no_grad():
        logits, feats = net.eval()(torch.zeros(2, 3, 224, 224))
    assert logits.shape == (2, 3) and feats.shape == (2, 2048)
    train = load_dataset(f"folder:{env['photos']}", env["root"], "train", resolution=224)
    assert isinstance(train.images, DiskImages) and train.images.shape == (60, 224, 224, 3)


@pytest.fixture(scope="module")
def prior(env: dict[str, Path], imported: Path) -> Path:
    out = env["tmp"] / "prior.json"
    ok("estimate-prior", imported, "--outliers", f"images:{env['tmp'] / 'outliers'}", "--data-root", env["root"],
       "--out", out, *RES, *TRUST)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fine_tunes_at_224(env: dict[str, Path], imported: Path, prior: Path, method: str) -> None:
    out = env["tmp"] / f"ft-{method}"
    extra = ["--prior", prior] if "balanced" in method else []
    ok("finetune", imported, "--method", method, "--outliers", f"images:{env['tmp'] / 'outliers'}",
       "--data-root", env["root"], "--out", out, "--epochs", "1", "--batch-size", "8", "--outlier-batch-size", "8",
       "--max-steps-per-epoch", "2", *RES, *TRUST, *extra)
    before, _ = load_feature_model(imported, trust_arch=[ARCH])
    after, meta = load_feature_model(out / "model.pt", trust_arch=[ARCH])
    assert meta.resolution == 224 and (meta.mean, meta.std) == IMAGENET
    assert not torch.equal(before.model.fc.weight, after.model.fc.weight)  # it trained


def test_every_score_then_calibrate_export_predict(env: dict[str, Path], imported: Path) -> None:
    tmp, root = env["tmp"], env["root"]
    scores = [a for s in SCORE_NAMES for a in ("--score", s)]
    report = tmp / "eval.json"
    ok("evaluate", imported, *scores, "--ood", f"images:{tmp / 'ood-a'}", "--ood", f"images:{tmp / 'ood-b'}",
       "--data-root", root, "--out", report, *RES, *TRUST)
    rows = [r for r in json.loads(report.read_text())["rows"] if str(r["dataset"]).startswith("images:")]
    assert {r["score"] for r in rows} == set(SCORE_NAMES) and len(rows) == 2 * len(SCORE_NAMES)
    assert all(0 <= r["auroc"] <= 100 for r in rows)
    detector = tmp / "detector.json"
    ok("calibrate", imported, "--calibration-data", f"folder:{env['photos'] / 'val'}", "--tpr", "0.75", "--out",
       detector, "--export", tmp / "detector.pt2", "--data-root", root, *RES, *TRUST)
    program, record = load_exported(tmp / "detector.pt2")
    assert record["resolution"] == 224
    logits, score, is_ood = program(torch.zeros(2, 224, 224, 3, dtype=torch.uint8))
    assert logits.shape == (2, 3) and score.shape == (2,) and is_ood.dtype == torch.bool
    preds = tmp / "preds.csv"
    res = ok("predict", imported, tmp / "ood-a", "--detector", detector, "--out", preds, *RES, *TRUST)
    assert "12 input(s)" in res.output and len(preds.read_text().splitlines()) == 13
