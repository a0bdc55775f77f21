"""The hierarchical bootstrap of paired differences (oodtune.metrics.bootstrap) against independent computation."""

from __future__ import annotations

import numpy as np
import pytest

from oodtune.errors import ConfigError
from oodtune.metrics import detection_metrics
from oodtune.metrics.bootstrap import (
    COMPARED_METRICS,
    LEVELS,
    compare_paired,
    draw_replicates,
    paired_cells,
    verdict,
    weighted_detection_metrics,
)

GROUPS = {"near": ["a"], "far": ["b", "c"], "all": ["a", "b", "c"]}


def _cell(rng: np.random.Generator, shift: float, n: int = 30, ties: bool = False) -> dict[str, np.ndarray]:
    def draw(loc: float, size: int) -> np.ndarray:
        x = rng.normal(loc, 1.0, size)
        return np.round(x, 1) if ties else x
    return {"id": draw(1.0, n), "a": draw(1.0 - shift, n + 3), "b": draw(0.5 - shift, n - 4),
            "c": draw(-shift, n + 7)}


def _design(seed: int, shift_a: float, shift_b: float, models: int = 5, seeds: int = 2,
            ties: bool = False) -> tuple[dict, dict]:
    """Two methods on the same images: per cell the ID/OOD scores of each method (A separates by shift_a)."""
    rng = np.random.default_rng(seed)
    base = {(k, s): _cell(rng, 0.0, ties=ties) for k in range(models) for s in range(seeds)}
    a, b = {}, {}
    for key, cell in base.items():
        model_effect = rng.normal(0, 0.2)
        a[key] = {n: v if n == "id" else v - shift_a - model_effect for n, v in cell.items()}
        b[key] = {n: v if n == "id" else v - shift_b for n, v in cell.items()}
    return a, b


def test_weighted_metrics_equal_the_metrics_of_the_resampled_arrays():
    rng = np.random.default_rng(0)
    s_id, s_ood = np.round(rng.normal(1, 1, 40), 1), np.round(rng.normal(0, 1, 25), 1)  # many ties
    w_id = rng.multinomial(40, np.full(40, 1 / 40), size=12)
    w_ood = rng.multinomial(25, np.full(25, 1 / 25), size=12)
    got = weighted_detection_metrics(s_id, s_ood, w_id, w_ood)
    for b in range(12):
        want = detection_metrics(np.repeat(s_id, w_id[b]), np.repeat(s_ood, w_ood[b]))
        for key, value in want.items():
            assert got[key][b] == pytest.approx(value, abs=1e-9), key


def test_unit_weights_give_the_plain_metrics():
    rng = np.random.default_rng(1)
    s_id, s_ood = rng.normal(1, 1, 50), rng.normal(0, 1, 60)
    got = weighted_detection_metrics(s_id, s_ood, np.ones((1, 50), int), np.ones((1, 60), int))
    want = detection_metrics(s_id, s_ood)
    assert {k: float(v[0]) for k, v in got.items()} == pytest.approx(want, abs=1e-9)


def test_bad_weights_are_refused():
    with pytest.raises(ConfigError, match="weights must be"):
        weighted_detection_metrics([1.0, 2.0], [0.0], np.ones((1, 3)), np.ones((1, 1)))
    with pytest.raises(ConfigError, match="at least one ID"):
        weighted_detection_metrics([1.0, 2.0], [0.0], np.zeros((1, 2)), np.ones((1, 1)))


def _resampled_group_metrics(cell, names, w):
    """The metrics of the explicitly resampled arrays, averaged over the OOD sets ``names``."""
    rows = [detection_metrics(np.repeat(cell["id"], w["id"]), np.repeat(cell[s], w[s])) for s in names]
    return {k: np.mean([row[k] for row in rows]) for k in COMPARED_METRICS}


@pytest.mark.parametrize("levels", [LEVELS, ("models",), ("seeds", "images"), ("images",)])
def test_vectorised_bootstrap_equals_a_naive_loop(levels):
    a, b = _design(2, 0.6, 0.3, models=3, seeds=2, ties=True)
    n_boot, seed = 40, 7
    got = {(i.group, i.metric): i for i in compare_paired(a, b, GROUPS, n_boot=n_boot, seed=seed, levels=levels,
                                                          block=16)}
    _, models, pairs = paired_cells(a, b)
    sizes = {n: len(pairs[0][0][n]) for n in ["id", "a", "b", "c"]}
    reps = {key: [] for key in got}
    for draws in draw_replicates(models, sizes, n_boot, seed, levels=levels, block=16):
        for r in range(len(draws.cells)):
            w = {name: weights[r] for name, weights in draws.images.items()}
            for g, names in GROUPS.items():
                per_cell = []
                for x, y in pairs:
                    ma, mb = _resampled_group_metrics(x, names, w), _resampled_group_metrics(y, names, w)
                    per_cell.append({k: ma[k] - mb[k] for k in COMPARED_METRICS})
                for k in COMPARED_METRICS:
                    reps[(g, k)].append(sum(wc * d[k] for wc, d in zip(draws.cells[r], per_cell, strict=True)))
    for key, interval in got.items():
        low, high = np.quantile(reps[key], [0.025, 0.975])
        assert interval.low == pytest.approx(low, abs=1e-9), key
        assert interval.high == pytest.approx(high, abs=1e-9), key
        assert interval.se == pytest.approx(np.std(reps[key], ddof=1), abs=1e-9), key


def test_point_estimate_is_the_mean_over_models_of_the_mean_over_seeds():
    a, b = _design(3, 0.6, 0.3, models=2, seeds=3)
    del a[(1, 2)]  # model 1 has two seeds for A: the cell is missing, so the pair is left out
    by_model: dict[int, list[float]] = {}
    for key in b:
        if key in a:
            diff = detection_metrics(a[key]["id"], a[key]["a"])["auroc"] - \
                detection_metrics(b[key]["id"], b[key]["a"])["auroc"]
            by_model.setdefault(key[0], []).append(diff)
    want = np.mean([np.mean(v) for v in by_model.values()])
    got = {(i.group, i.metric): i for i in compare_paired(a, b, GROUPS, n_boot=5)}
    assert got[("near", "auroc")].difference == pytest.approx(want, abs=1e-9)
    assert got[("near", "auroc")].cells == 5 and got[("near", "auroc")].models == 2


def test_without_resampling_every_replicate_is_the_point_estimate():
    a, b = _design(4, 0.6, 0.3, models=3, seeds=2)
    for i in compare_paired(a, b, GROUPS, n_boot=20, levels=()):
        assert i.low == pytest.approx(i.difference, abs=1e-9) and i.high == pytest.approx(i.difference, abs=1e-9)


def test_one_model_one_seed_one_image_per_set_collapses_to_the_point_estimate():
    a = {(0, 0): {"id": np.array([1.0]), "a": np.array([0.2]), "b": np.array([0.9]), "c": np.array([3.0])}}
    b = {(0, 0): {"id": np.array([1.0]), "a": np.array([2.0]), "b": np.array([0.1]), "c": np.array([0.5])}}
    for i in compare_paired(a, b, GROUPS, n_boot=50):
        assert i.low == i.high == pytest.approx(i.difference), (i.group, i.metric)


def test_identical_methods_differ_by_exactly_zero_and_establish_nothing():
    a, _ = _design(5, 0.5, 0.5)
    for i in compare_paired(a, a, GROUPS, n_boot=30):
        assert i.difference == i.low == i.high == 0.0
        assert i.verdict == "not established"


def test_a_clearly_better_method_is_established_and_the_reverse_refuted():
    a, b = _design(6, 1.5, 0.0)
    forward = compare_paired(a, b, GROUPS, n_boot=200)
    assert all(i.verdict == "established" for i in forward), [(i.metric, i.low, i.high) for i in forward]
    assert all(i.difference > 0 if i.metric.startswith("au") else i.difference < 0 for i in forward)
    assert all(i.verdict == "refuted" for i in compare_paired(b, a, GROUPS, n_boot=200))


def test_model_to_model_variation_widens_the_interval():
    """The same within-model noise, plus a spread of the effect across pretrained models: resampling the models
    must give a wider interval than resampling the images alone."""
    a, b = _design(8, 0.5, 0.3, models=6, seeds=2)
    rng = np.random.default_rng(0)
    spread = {k: rng.normal(0, 1.0) for k in range(6)}
    a = {key: {n: v if n == "id" else v - spread[key[0]] for n, v in cell.items()} for key, cell in a.items()}
    full = {(i.group, i.metric): i.high - i.low for i in compare_paired(a, b, GROUPS, n_boot=300)}
    images = {(i.group, i.metric): i.high - i.low for i in compare_paired(a, b, GROUPS, n_boot=300,
                                                                          levels=("images",))}
    assert full[("all", "auroc")] > 1.5 * images[("all", "auroc")]


def test_reproducible_under_the_seed():
    a, b = _design(9, 0.4, 0.3)
    first = compare_paired(a, b, GROUPS, n_boot=60, seed=3)
    assert first == compare_paired(a, b, GROUPS, n_boot=60, seed=3)
    assert first != compare_paired(a, b, GROUPS, n_boot=60, seed=4)


def test_a_posthoc_row_joins_every_seed_of_its_model():
    a, b = _design(10, 0.5, 0.3, models=2, seeds=2)
    posthoc = {(k, None): b[(k, 0)] for k in range(2)}
    got = compare_paired(a, posthoc, GROUPS, n_boot=5)
    assert got[0].cells == 4 and got[0].models == 2


@pytest.mark.parametrize(("metric", "low", "high", "want"), [
    ("auroc", 0.1, 2.0, "established"), ("auroc", -2.0, -0.1, "refuted"), ("auroc", -0.1, 2.0, "not established"),
    ("fpr95", -3.0, -0.2, "established"), ("fpr95_in", 0.2, 3.0, "refuted"), ("aupr_out", 0.0, 1.0, "not established"),
])
def test_verdict_words(metric, low, high, want):
    assert verdict(low, high, metric) == want


def test_refuses_designs_it_cannot_compare():
    a, b = _design(11, 0.5, 0.3, models=1, seeds=1)
    with pytest.raises(ConfigError, match="share no"):
        compare_paired(a, {(5, 0): b[(0, 0)]}, GROUPS)
    other = {(0, 0): {**b[(0, 0)], "a": b[(0, 0)]["a"][:-1]}}
    with pytest.raises(ConfigError, match="same images"):
        compare_paired(a, other, GROUPS)


def _frames(rng: np.random.Generator, n_frames: int, frame_sd: float, shift: float
            ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[int], list[int]]:
    """Two detectors on the same pixel samples of ``n_frames`` frames: each frame shifts its pixels' scores by a
    common draw (frame_sd), and detector A separates anomalies by ``shift`` more than B."""
    fin, fout = rng.integers(5, 15, n_frames).tolist(), rng.integers(0, 6, n_frames).tolist()
    fout[0] = max(fout[0], 1)
    effect_in = np.repeat(rng.normal(0, frame_sd, n_frames), fin)
    effect_out = np.repeat(rng.normal(0, frame_sd, n_frames), fout)
    s_in, s_out = rng.normal(1, 1, sum(fin)) + effect_in, rng.normal(0, 1, sum(fout)) + effect_out
    a = (s_in, s_out - shift + effect_out)  # A's frame effect on anomalies differs from B's
    return a, (s_in, s_out), fin, fout


def test_clustered_gain_se_equals_a_naive_frame_bootstrap():
    from oodtune.metrics.bootstrap import clustered_gain_se

    rng = np.random.default_rng(3)
    a, b, fin, fout = _frames(rng, 12, 1.0, 0.3)
    se = clustered_gain_se(a, b, fin, fout, metric="auroc", replicates=50, seed=7)
    draws = np.random.default_rng(7).multinomial(12, np.full(12, 1 / 12), size=50)
    starts_in, starts_out = np.cumsum([0, *fin]), np.cumsum([0, *fout])
    diffs = []
    for row in draws:
        frames = np.repeat(np.arange(12), row)
        pick_in = np.concatenate([np.arange(starts_in[f], starts_in[f + 1]) for f in frames])
        pick_out = np.concatenate([np.arange(starts_out[f], starts_out[f + 1]) for f in frames])
        if not len(pick_out):
            continue
        diffs.append(detection_metrics(a[0][pick_in], a[1][pick_out])["auroc"]
                     - detection_metrics(b[0][pick_in], b[1][pick_out])["auroc"])
    assert se == pytest.approx(np.std(diffs, ddof=1), rel=1e-9)


def test_frame_clusters_widen_the_se_of_correlated_pixels():
    from oodtune.metrics.bootstrap import clustered_gain_se

    a, b, fin, fout = _frames(np.random.default_rng(0), 40, 1.5, 0.3)
    by_frame = clustered_gain_se(a, b, fin, fout)
    n_in, n_out = sum(fin), sum(fout)
    by_pixel = clustered_gain_se(a, b, [1] * n_in + [0] * n_out, [0] * n_in + [1] * n_out)
    assert by_frame > 1.5 * by_pixel


def test_clustered_gain_se_refuses_unpaired_samples():
    from oodtune.metrics.bootstrap import clustered_gain_se

    a, b, fin, fout = _frames(np.random.default_rng(0), 5, 1.0, 0.3)
    with pytest.raises(ConfigError, match="same samples"):
        clustered_gain_se(a, (b[0][:-1], b[1]), fin, fout)
    with pytest.raises(ConfigError, match="same samples"):
        clustered_gain_se(a, b, fin[:-1], fout)


def _segmentation_design(seed: int, shift_a: float, shift_b: float, seeds: int = 3) -> tuple[dict, dict]:
    """Two methods on the same frames of sets "a" and "b" (segmentation cells): per frame a number of sampled
    inlier and anomaly pixels, a frame-level score shift, the same pixel positions in every cell."""
    rng = np.random.default_rng(seed)
    layout = {s: (rng.integers(3, 9, 10), rng.integers(1, 4, 10)) for s in ("a", "b")}
    a, b = {}, {}
    for s_ in range(seeds):
        cell_a: dict = {"id": np.zeros(1), "inliers": {}, "frames": {}}
        cell_b: dict = {"id": np.zeros(1), "inliers": {}, "frames": {}}
        for name, (fin, fout) in layout.items():
            frame = rng.normal(0, 1, 10)
            inl = np.round(rng.normal(1, 1, fin.sum()) + np.repeat(frame, fin), 1)
            out = np.round(rng.normal(0, 1, fout.sum()) + np.repeat(frame, fout), 1)
            for cell, shift in ((cell_a, shift_a), (cell_b, shift_b)):
                cell["inliers"][name], cell[name] = inl, out - shift
                cell["frames"][name] = (fin.tolist(), fout.tolist())
        a[(0, s_)], b[(0, s_)] = cell_a, cell_b
    return a, b


def test_segmentation_bootstrap_draws_frames_and_equals_a_naive_loop():
    a, b = _segmentation_design(4, 0.8, 0.2)
    groups = {"all": ["a", "b"]}
    n_boot, seed = 30, 5
    got = {(i.group, i.metric): i for i in compare_paired(a, b, groups, n_boot=n_boot, seed=seed, block=8)}
    _, models, pairs = paired_cells(a, b)
    frames = pairs[0][0]["frames"]
    reps: dict = {key: [] for key in got}
    for draws in draw_replicates(models, dict.fromkeys(("a", "b"), 10), n_boot, seed, block=8):
        for r in range(len(draws.cells)):
            per_cell = []
            for x, y in pairs:
                diffs = []
                for s in ("a", "b"):
                    fin, fout = frames[s]
                    w_in = np.repeat(draws.images[s][r], fin)  # every pixel of a drawn frame, as often as drawn
                    w_out = np.repeat(draws.images[s][r], fout)
                    ma = detection_metrics(np.repeat(x["inliers"][s], w_in), np.repeat(x[s], w_out))
                    mb = detection_metrics(np.repeat(y["inliers"][s], w_in), np.repeat(y[s], w_out))
                    diffs.append({k: ma[k] - mb[k] for k in COMPARED_METRICS})
                per_cell.append({k: np.mean([d[k] for d in diffs]) for k in COMPARED_METRICS})
            for k in COMPARED_METRICS:
                reps[("all", k)].append(sum(wc * d[k] for wc, d in zip(draws.cells[r], per_cell, strict=True)))
    for key, interval in got.items():
        assert interval.se == pytest.approx(np.std(reps[key], ddof=1), abs=1e-9), key
        assert interval.low == pytest.approx(np.quantile(reps[key], 0.025), abs=1e-9), key
    assert got[("all", "auroc")].verdict == "established"


def test_segmentation_cells_must_share_their_frames():
    a, b = _segmentation_design(4, 0.8, 0.2)
    b[(0, 1)]["frames"]["a"] = (b[(0, 1)]["frames"]["a"][0][::-1], b[(0, 1)]["frames"]["a"][1])
    with pytest.raises(ConfigError, match="same frames"):
        compare_paired(a, b, {"all": ["a", "b"]}, n_boot=5)
