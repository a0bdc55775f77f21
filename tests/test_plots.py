"""oodtune.plots writes valid, non-empty PNGs and leaves no matplotlib figure open."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import oodtune.plots as plots
from oodtune.metrics import auroc, roc_curve
from oodtune.plots import (
    PALETTE,
    plot_class_prior,
    plot_energy_histograms,
    plot_roc_curves,
    plot_score_histograms,
    short_name,
)

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


@pytest.fixture
def figures(monkeypatch):
    """Keep every figure the plot functions save (they still write the PNG)."""
    kept = []
    real = plots._save

    def keep(fig, path, **kw):
        kept.append(fig)
        return real(fig, path, **kw)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_histograms_share_axes_and_name_each_set_with_its_auroc(tmp_path, energies, figures):
    e_id, e_ood = energies
    plot_energy_histograms(tmp_path / "e.png", e_id, e_ood, before=(e_id + 5, e_ood))
    before, after = figures[0].axes
    assert before.get_xlim() == after.get_xlim() and before.get_ylim() == after.get_ylim()
    expected = f"svhn (AUROC {100 * auroc(-e_id, -e_ood['svhn']):.1f})"
    assert expected in _legend(after) and "ID" in _legend(after)
    colours = {p.get_edgecolor()[:3] for p in after.patches if p.get_label().startswith(("svhn", "dtd"))}
    assert len(colours) == 2  # one distinct colour per OOD set
    plot_score_histograms(tmp_path / "s.png", -e_id, {"folder:/data/x/my-set": -e_ood["dtd"]}, score="energy")
    assert any(t.startswith("folder:my-set (AUROC") for t in _legend(figures[1].axes[0]))


def test_roc_per_model_and_set_with_log_fpr(tmp_path, figures):
    rng = np.random.default_rng(1)
    id_s = rng.normal(1, 1, 400)
    sets = {"a": rng.normal(0, 1, 300), "b": rng.normal(-1, 1, 300)}
    curves = {(m, n): roc_curve(k * id_s, v) for m, k in (("pretrained", 1), ("tuned", 3)) for n, v in sets.items()}
    assert_png(plot_roc_curves(tmp_path / "roc.png", curves, log_fpr=True))
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log"
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert lines["a: tuned (AUROC " + f"{100 * auroc(3 * id_s, sets['a']):.1f})"].get_linestyle() == "-"
    pre_a = next(ln for label, ln in lines.items() if label.startswith("a: pretrained"))
    assert pre_a.get_linestyle() == "--" and pre_a.get_color() == PALETTE[0]


def test_prior_shows_p_and_p_gamma(tmp_path, figures):
    names = ["a", "b", "c"]
    plot_class_prior(tmp_path / "p.png", [3, 2, 1], [0.7, 0.2, 0.1], names, gamma_priors={0.05: [0.35, 0.33, 0.32]})
    labels = _legend(figures[0].axes[1])
    assert "P(y|o), γ = 1 (estimated)" in labels and "P_γ, γ = 0.05 (used by the loss)" in labels


def test_short_names():
    assert short_name("folder:/very/long/path/set") == "folder:set"
    assert short_name("/runs/x/bal/model.pt") == "bal/model.pt" and short_name("mnist") == "mnist"


def test_sampled_figures_show_the_tables_auroc_and_say_sampled(tmp_path, figures):
    """A segmentation report's plotted scores are a pixel sample: legends carry the table's number (over all
    pixels), and the figure says it is sampled, with n."""
    from oodtune.evaluation import EvalReport
    from oodtune.report import write_evaluation_plots

    rng = np.random.default_rng(2)
    report = EvalReport(id_metrics={}, rows=[{"score": "energy", "dataset": "road-anomaly", "auroc": 70.5}],
                        scores={"energy": {"road-anomaly": rng.normal(0, 1, 300), "id": rng.normal(1, 1, 400)}})
    write_evaluation_plots(tmp_path / "p", report)
    hist, roc = figures[0], figures[1]
    assert "road-anomaly (AUROC 70.5)" in _legend(hist.axes[0])
    assert "energy score -E(x)" in hist.axes[0].get_xlabel() and "higher = more in-distribution" in \
        hist.axes[0].get_xlabel()
    assert "sampled, n = ID 400, road-anomaly 300" in hist._suptitle.get_text()
    assert any(t.startswith("road-anomaly: energy (AUROC 70.5)") for t in _legend(roc.axes[0]))
    assert "sampled, n = ID 400" in roc.axes[0].get_title()
    full = EvalReport(id_metrics={}, rows=[{"score": "msp", "dataset": "svhn", "auroc": 61.0, "n_ood": 300,
                                            "n_id": 400}],
                      scores={"msp": {"svhn": rng.normal(0, 1, 300), "id": rng.normal(1, 1, 400)}})
    write_evaluation_plots(tmp_path / "q", full)
    assert "sampled" not in figures[2]._suptitle.get_text()


def test_anomaly_maps_have_colour_bars_and_name_the_direction(tmp_path, figures):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 12, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (2, 12, 16)).astype(np.uint8)
    maps = {"before": rng.normal(0, 1, (2, 12, 16)), "after": rng.normal(0, 1, (2, 12, 16))}
    assert_png(plots.plot_anomaly_maps(tmp_path / "m.png", frames, labels, maps, score="energy"))
    fig = figures[0]
    images = [ax for ax in fig.axes if ax.get_images()]
    assert len(images) == 2 * 4 and len(fig.axes) == len(images) + 2  # a colour bar per frame
    named = fig._supxlabel.get_text()
    assert "energy score -E(x)" in named and "higher = more in-distribution" in named
    assert {ax.get_title() for ax in fig.axes} >= {"before\n(bright = anomalous)", "after\n(bright = anomalous)"}
    with pytest.raises(plots.ConfigError, match="same n"):
        plots.plot_anomaly_maps(tmp_path / "x.png", frames, labels, {"a": np.zeros((1, 12, 16))})


def test_calibration_histogram_draws_the_threshold(tmp_path, figures):
    rng = np.random.default_rng(4)
    plots.plot_calibration(tmp_path / "c.png", rng.normal(0, 1, 500), -1.64, score="energy", tpr=0.95,
                           check_scores=rng.normal(0, 1, 300))
    ax = figures[0].axes[0]
    threshold = [ln for ln in ax.get_lines() if ln.get_label().startswith("threshold")]
    assert len(threshold) == 1 and threshold[0].get_xdata()[0] == pytest.approx(-1.64)
    assert any("n = 300" in t for t in _legend(ax)) and "higher = more in-distribution" in ax.get_xlabel()


def test_forest_plot_draws_every_comparison_and_refuses_nothing_to_draw(tmp_path):
    from oodtune.errors import ConfigError
    from oodtune.plots import plot_forest
    rows = [{"comparison": c, "group": g, "metric": m, "difference": 0.5, "low": -0.1, "high": 1.0,
             "verdict": "not established"} for c in ("A vs B", "C vs D") for g in ("near", "far")
            for m in ("auroc", "fpr95")]
    path = plot_forest(tmp_path / "forest.png", rows, ["auroc", "fpr95"], {"auroc": "AUROC"}, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="no comparison rows"):
        plot_forest(tmp_path / "empty.png", [], ["auroc"], {})
