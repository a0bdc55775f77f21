"""oodtune.plots writes valid, non-empty PNGs and leaves no matplotlib figure open."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from oodtune.metrics import roc_curve
from oodtune.plots import plot_class_prior, plot_energy_histograms, plot_roc_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert plt.get_fignums() == [], "a figure was left open"


@pytest.fixture
def energies():
    rng = np.random.default_rng(0)
    return rng.normal(-10, 2, 500), {"svhn": rng.normal(-5, 2, 300), "dtd": rng.normal(-7, 3, 200)}


@pytest.mark.parametrize("with_before", [False, True])
def test_energy_histograms(tmp_path, energies, with_before):
    e_id, e_ood = energies
    before = (e_id + 2, {k: v - 1 for k, v in e_ood.items()}) if with_before else None
    out = plot_energy_histograms(tmp_path / "sub" / "energy.png", e_id, e_ood, title="Energy-OE", before=before)
    assert out == tmp_path / "sub" / "energy.png"
    assert_png(out)


def test_roc_curves(tmp_path):
    rng = np.random.default_rng(1)
    id_s, ood_s = rng.normal(1, 1, 400), rng.normal(0, 1, 400)
    curves = {"pretrained": roc_curve(id_s, ood_s)[:2], "fine-tuned": roc_curve(2 * id_s, ood_s)[:2]}
    assert_png(plot_roc_curves(tmp_path / "roc.png", curves, title="ROC"))


def test_class_prior(tmp_path):
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    prior = np.array([0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert_png(plot_class_prior(tmp_path / "prior.png", counts, prior, names))
    names100 = [f"c{i}" for i in range(100)]
    assert_png(plot_class_prior(tmp_path / "prior100.png", [0] * 100, np.full(100, 0.01), names100))


def test_bad_inputs_raise_and_close(tmp_path, energies):
    e_id, e_ood = energies
    with pytest.raises(ValueError, match="ood_energies is empty"):
        plot_energy_histograms(tmp_path / "e.png", e_id, {})
    with pytest.raises(ValueError, match="NaN"):
        plot_energy_histograms(tmp_path / "e.png", np.r_[e_id, np.nan], e_ood)
    with pytest.raises(ValueError, match="curves is empty"):
        plot_roc_curves(tmp_path / "r.png", {})
    with pytest.raises(ValueError, match="one non-empty entry per class"):
        plot_class_prior(tmp_path / "p.png", [1, 2], [0.5, 0.5], ["a"])
    assert plt.get_fignums() == []
