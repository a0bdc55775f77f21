"""Paired differences of detection metrics with a hierarchical bootstrap confidence interval.

The design (nested seeds): ``K`` independently pretrained models; each fine-tuned with ``S_k`` seeds per method;
every (model, seed) *cell* scored on the same ID test images and the same images of every OOD set. A comparison
of method A with method B on metric M is the paired difference averaged over the cells,

    D = (1/K) sum_k (1/S_k) sum_s [ M(A_ks) - M(B_ks) ]

(M of an OOD group — near, far, all — is the mean of M over its sets, as the tables print it). A post-hoc row,
which has no fine-tuning seed, is the same detector in every seed of its model.

**Hierarchical bootstrap** (one replicate): draw K models with replacement; for each drawn model draw S_k of its
seeds with replacement; draw the ID test images, and the images of each OOD set, with replacement, each set on
its own (ID and OOD are never mixed). Every cell and both methods are scored on the *same* image draw: the cells
are crossed with the images (every model sees the same test set), so an image that is hard for one model is hard
for all and its draw must move them together — drawing images anew per cell would treat them as independent and
shrink the interval. ``D*`` of the replicate is the same average over the drawn models and seeds. The 95 % CI is
the 2.5 and 97.5 percentiles of ``D*`` over ``n_boot`` replicates (percentile interval); ``se`` is their std.

**Segmentation** cells carry, per anomaly set, a seeded sample of its inlier and anomaly pixel scores with the
number each frame gave (``inliers``, ``frames``; the same frames and pixel positions in every cell): there the
unit drawn is the frame of each set, its sampled inlier and anomaly pixels together, since pixels of one frame are
correlated; the metrics are those of the pixel samples.

Resampled images are represented by their multiplicities (how many times each image was drawn), and a metric of
the resampled scores is computed from weighted tie-group counts of one sort of the original scores — exactly the
value :func:`.ood.detection_metrics` gives on the resampled arrays (``tests/test_bootstrap.py`` checks it against
that naive loop), for a whole block of replicates at once.

**Verdicts** (:func:`verdict`), for the claim "A is better than B" (higher AUROC / AUPR, lower FPR95):
*established* — the CI lies entirely on the side of the claim (it excludes 0 in the claimed direction);
*refuted* — the CI lies entirely on the opposite side (B is better, by the same standard);
*not established* — the CI contains 0 (this is not evidence of no difference: the data cannot tell).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .ood import _check_scores, _check_tpr

__all__ = ["COMPARED_METRICS", "HIGHER_IS_BETTER", "LEVELS", "VERDICTS", "Draws", "Interval", "clustered_gain_se",
           "compare_paired", "draw_replicates", "paired_cells", "verdict", "weighted_detection_metrics"]

#: The metrics every comparison reports (percent): AUROC, AUPR-Out and FPR95 under both conventions.
COMPARED_METRICS = ("auroc", "aupr_out", "fpr95", "fpr95_in")
#: Direction of "better" per detection metric.
HIGHER_IS_BETTER = {"auroc": True, "aupr_in": True, "aupr_out": True, "fpr95": False, "fpr95_in": False}
#: The levels a replicate resamples, outermost first.
LEVELS = ("models", "seeds", "images")
VERDICTS = ("established", "refuted", "not established")

#: Scores of one cell: "id" and each OOD set name -> per-image scores (higher = more in-distribution).
CellScores = Mapping[str, Any]
#: A method's cells: (model, seed) -> scores; a post-hoc row uses seed None (the same in every seed).
MethodCells = Mapping[tuple[Hashable, Hashable], CellScores]


# ----------------------------------------------------------------------------- weighted metrics


@dataclass(frozen=True)
class _Sorted:
    """One sort of ID + OOD scores (decreasing), reused by every replicate: the permutation, which entries are ID,
    and the last position of each tie group."""

    order: np.ndarray
    is_id: np.ndarray
    ends: np.ndarray
    n_id: int

    @classmethod
    def build(cls, id_scores: Any, ood_scores: Any) -> _Sorted:
        s_id, s_ood = _check_scores(id_scores, "id_scores"), _check_scores(ood_scores, "ood_scores")
        scores = np.concatenate([s_id, s_ood]).astype(np.float64)
        order = np.argsort(-scores, kind="stable")
        s = scores[order]
        return cls(order, order < s_id.size, np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1], s_id.size)

    def metrics(self, w_id: np.ndarray, w_ood: np.ndarray, tpr: float) -> dict[str, np.ndarray]:
        """Detection metrics (percent, shape (B,)) of the samples weighted by ``w_id`` (B, n_id) / ``w_ood``."""
        w = np.concatenate([w_id, w_ood], axis=1)[:, self.order].astype(np.float64)
        cum_id = np.cumsum(np.where(self.is_id, w, 0.0), axis=1)[:, self.ends]
        cum_all = np.cumsum(w, axis=1)[:, self.ends]
        n_id = np.diff(cum_id, axis=1, prepend=0.0)  # per tie group, decreasing score
        n_ood = np.diff(cum_all - cum_id, axis=1, prepend=0.0)
        tot_id, tot_ood = cum_id[:, -1], cum_all[:, -1] - cum_id[:, -1]
        ood_below = tot_ood[:, None] - np.cumsum(n_ood, axis=1)
        auroc = np.sum(n_id * (2 * ood_below + n_ood), axis=1) / (2.0 * tot_id * tot_ood)
        out = {"auroc": auroc, "aupr_in": _ap(n_id, n_ood), "aupr_out": _ap(n_ood[:, ::-1], n_id[:, ::-1]),
               "fpr95": _fpr_at(n_ood[:, ::-1], n_id[:, ::-1], tpr), "fpr95_in": _fpr_at(n_id, n_ood, tpr)}
        return {k: 100.0 * v for k, v in out.items()}


def _ap(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision per row; groups ordered from most to least positive-looking (empty groups add 0)."""
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    return np.sum(pos * precision, axis=1) / tp[:, -1]


def _fpr_at(pos: np.ndarray, neg: np.ndarray, tpr: float) -> np.ndarray:
    """Smallest FPR among operating points with TPR >= ``tpr`` (the ``rule="first"`` of :mod:`.ood`), per row."""
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    tpr_curve = np.c_[np.zeros(len(tp)), tp / tp[:, -1:]]
    fpr_curve = np.c_[np.zeros(len(fp)), fp / fp[:, -1:]]
    first = np.argmax(tpr_curve >= tpr, axis=1)
    return fpr_curve[np.arange(len(first)), first]


def weighted_detection_metrics(id_scores: Any, ood_scores: Any, w_id: Any, w_ood: Any, *,
                               tpr: float = 0.95) -> dict[str, np.ndarray]:
    """:func:`.ood.detection_metrics` of ``B`` resamples given as multiplicities: ``w_id`` (B, n_id) and ``w_ood``
    (B, n_ood) non-negative counts (row b: image i appears ``w[b, i]`` times). Returns arrays of shape (B,)."""
    _check_tpr(tpr)
    srt = _Sorted.build(id_scores, ood_scores)
    a, b = np.atleast_2d(np.asarray(w_id)), np.atleast_2d(np.asarray(w_ood))
    if a.shape[1] != srt.n_id or b.shape[1] != srt.order.size - srt.n_id or len(a) != len(b):
        raise ConfigError(f"weights must be (B, n_id) and (B, n_ood) for {srt.n_id} ID and "
                          f"{srt.order.size - srt.n_id} OOD scores, got {a.shape} and {b.shape}.")
    if (a < 0).any() or (b < 0).any() or (a.sum(1) == 0).any() or (b.sum(1) == 0).any():
        raise ConfigError("weights must be non-negative with at least one ID and one OOD sample per row.")
    return srt.metrics(a, b, tpr)


def clustered_gain_se(a: tuple[Any, Any], b: tuple[Any, Any], frames_in: Sequence[int], frames_out: Sequence[int],
                      *, metric: str = "auroc", replicates: int = 200, seed: int = 0) -> float:
    """Standard error (points) of ``metric(a) - metric(b)`` for two detectors scored on the same samples, which come
    in clusters: ``a`` and ``b`` are (ID scores, OOD scores), and cluster (frame) f gave ``frames_in[f]`` of the ID
    samples and ``frames_out[f]`` of the OOD ones, in order (pixel samples of segmentation frames). A replicate
    draws the clusters with replacement, both sides of a cluster together, the same draw for both detectors; a
    replicate that drew no OOD or no ID sample is left out. Pixels of one frame are correlated, so resampling
    pixels one by one would understate this SE."""
    fin, fout = np.asarray(frames_in, dtype=np.int64), np.asarray(frames_out, dtype=np.int64)
    sizes = [len(np.asarray(x)) for x in (*a, *b)]
    if len(fin) != len(fout) or sizes[0] != sizes[2] or sizes[1] != sizes[3] or fin.sum() != sizes[0] \
            or fout.sum() != sizes[1]:
        raise ConfigError(f"the two detectors must score the same samples, {int(fin.sum())} ID and "
                          f"{int(fout.sum())} OOD by the frame counts; got {sizes[0]}/{sizes[2]} ID and "
                          f"{sizes[1]}/{sizes[3]} OOD scores.")
    n = len(fin)
    draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=replicates)
    w_in, w_out = np.repeat(draws, fin, axis=1), np.repeat(draws, fout, axis=1)
    keep = (w_in.sum(1) > 0) & (w_out.sum(1) > 0)
    if keep.sum() < 2:
        raise ConfigError("fewer than two replicates drew both ID and OOD samples; too few frames for a SE.")
    diff = (weighted_detection_metrics(*a, w_in[keep], w_out[keep])[metric]
            - weighted_detection_metrics(*b, w_in[keep], w_out[keep])[metric])
    return float(diff.std(ddof=1))


# ----------------------------------------------------------------------------- the resampling plan


@dataclass(frozen=True)
class Draws:
    """One block of replicates: ``cells`` (B, C) weight of each cell in the replicate's average (the drawn models
    and seeds; rows sum to 1) and ``images`` per set name ("id" and each OOD set) (B, n) multiplicities."""

    cells: np.ndarray
    images: dict[str, np.ndarray]


def _cell_weights(models: Sequence[Sequence[int]], rng: np.random.Generator, levels: Sequence[str]) -> np.ndarray:
    """(C,) weights of one replicate's average: ``models[k]`` lists the cell indices of model k; each drawn model
    weighs 1/K, shared equally by its drawn seeds."""
    w = np.zeros(sum(len(m) for m in models))
    drawn = rng.integers(0, len(models), len(models)) if "models" in levels else range(len(models))
    for k in drawn:
        cells = np.asarray(models[k], dtype=np.int64)
        chosen = cells[rng.integers(0, cells.size, cells.size)] if "seeds" in levels else cells
        np.add.at(w, chosen, 1.0 / cells.size)
    return w / len(models)


def draw_replicates(models: Sequence[Sequence[int]], sizes: Mapping[str, int], n_boot: int, seed: int, *,
                    levels: Sequence[str] = LEVELS, block: int = 100) -> Iterator[Draws]:
    """The replicates of :func:`compare_paired` in blocks of ``block`` (module docstring), reproducible from
    ``seed``. ``models[k]``: the cell indices of model k; ``sizes``: images per set. A level not in ``levels`` is
    kept as observed (all models / all seeds / every image once)."""
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise ConfigError(f"unknown bootstrap level(s) {unknown}; choose from {', '.join(LEVELS)}")
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        cells = np.stack([_cell_weights(models, rng, levels) for _ in range(size)])
        images = {name: (rng.multinomial(n, np.full(n, 1.0 / n), size=size) if "images" in levels
                         else np.ones((size, n), dtype=np.int64)) for name, n in sizes.items()}
        yield Draws(cells, images)


# ----------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class Interval:
    """A paired difference (A - B, metric units) with its bootstrap CI, standard error and verdict."""

    metric: str
    group: str
    difference: float
    low: float
    high: float
    se: float
    verdict: str
    models: int
    cells: int
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(low: float, high: float, metric: str) -> str:
    """The verdict on "A is better than B" from the CI [low, high] of A - B (module docstring)."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0:
        return "established"
    if hi < 0:
        return "refuted"
    return "not established"


def paired_cells(a: MethodCells, b: MethodCells) -> tuple[list[Hashable], list[list[int]], list[tuple[CellScores,
                                                                                                   CellScores]]]:
    """The (model, seed) cells where both methods have scores; a post-hoc side (seed None) joins every seed."""
    def get(m: MethodCells, key: tuple[Hashable, Hashable]) -> CellScores | None:
        return m.get(key, m.get((key[0], None)))
    keys = sorted({k for k in [*a, *b] if k[1] is not None} or set(a), key=repr)
    pairs = [(k, get(a, k), get(b, k)) for k in keys]
    found = [(k, x, y) for k, x, y in pairs if x is not None and y is not None]
    model_ids = list(dict.fromkeys(k[0] for k, _, _ in found))
    models = [[i for i, (k, _, _) in enumerate(found) if k[0] == m] for m in model_ids]
    return model_ids, models, [(x, y) for _, x, y in found]


def compare_paired(a: MethodCells, b: MethodCells, groups: Mapping[str, Sequence[str]], *, n_boot: int = 2000,
                   seed: int = 0, confidence: float = 0.95, levels: Sequence[str] = LEVELS,
                   metrics: Sequence[str] = COMPARED_METRICS, tpr: float = 0.95, block: int = 100
                   ) -> list[Interval]:
    """A - B per OOD group (``groups``: name -> its OOD sets, e.g. near / far / all) and metric, with the
    hierarchical bootstrap CI of the module docstring. Cells missing for either method are left out (a partial
    design); raises ConfigError when no cell is shared or the cells were not scored on the same images."""
    if n_boot < 1 or not 0 < confidence < 1:
        raise ConfigError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot} and {confidence}")
    model_ids, models, pairs = paired_cells(a, b)
    if not pairs:
        raise ConfigError("the two methods share no (pretrained model, seed) cell; nothing to compare yet.")
    sets = list(dict.fromkeys(s for names in groups.values() for s in names))
    frames = _shared_frames(pairs, sets)
    sizes = _shared_sizes(pairs, sets) if frames is None else {s: len(frames[s][0]) for s in sets}
    sorted_ = [{s: (_Sorted.build(_inliers(x, s), x[s]), _Sorted.build(_inliers(y, s), y[s])) for s in sets}
               for x, y in pairs]

    def weights(images: Mapping[str, np.ndarray], s: str) -> tuple[np.ndarray, np.ndarray]:
        """(ID, OOD) multiplicities of set ``s``'s samples: drawn images, or each drawn frame's pixels."""
        if frames is None:
            return images["id"], images[s]
        return np.repeat(images[s], frames[s][0], axis=1), np.repeat(images[s], frames[s][1], axis=1)

    def differences(images: Mapping[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
        """(group, metric) -> (cells, B) differences A - B under the image multiplicities ``images``."""
        per_set = [{s: _diff(*srt[s], *weights(images, s), tpr) for s in sets} for srt in sorted_]
        return {(g, m): np.stack([np.mean([d[s][m] for s in names], axis=0) for d in per_set])
                for g, names in groups.items() for m in metrics}

    observed = next(draw_replicates(models, sizes, 1, seed, levels=()))
    point = {key: float(observed.cells[0] @ d[:, 0]) for key, d in differences(observed.images).items()}
    reps: dict[tuple[str, str], list[np.ndarray]] = {key: [] for key in point}
    for draws in draw_replicates(models, sizes, n_boot, seed, levels=levels, block=block):
        for key, d in differences(draws.images).items():
            reps[key].append(np.einsum("bc,cb->b", draws.cells, d))
    alpha = (1 - confidence) / 2
    out = []
    for (g, m), diff in point.items():
        values = np.concatenate(reps[(g, m)])
        low, high = (float(v) for v in np.quantile(values, [alpha, 1 - alpha]))
        out.append(Interval(m, g, diff, low, high, float(values.std(ddof=1)) if values.size > 1 else 0.0,
                            verdict(low, high, m), len(model_ids), len(pairs), n_boot))
    return out


def _inliers(cell: CellScores, s: str) -> Any:
    """The ID side of set ``s``: a segmentation cell's own inlier pixels of that set, else the ID test images."""
    return cell["inliers"][s] if "inliers" in cell else cell["id"]


def _shared_sizes(pairs: Sequence[tuple[CellScores, CellScores]], sets: Sequence[str]) -> dict[str, int]:
    """Classification cells: the number of images of the ID test set and of each OOD set, the same in every cell
    (checked)."""
    sizes = {name: len(pairs[0][0][name]) for name in ["id", *sets]}
    for x, y in pairs:
        for name, n in sizes.items():
            if len(x[name]) != n or len(y[name]) != n:
                raise ConfigError(f"every cell must be scored on the same images: {name} has {n} images in one cell "
                                  f"and {len(x[name])} / {len(y[name])} in another.")
    return sizes


def _shared_frames(pairs: Sequence[tuple[CellScores, CellScores]], sets: Sequence[str]
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Segmentation cells (``frames[set]`` = (inlier, anomaly) sampled pixels per frame, ``inliers[set]``): the
    frame counts every cell shares, checked; None for classification cells (per-image scores)."""
    first = pairs[0][0]
    if "frames" not in first:
        return None
    out = {s: (np.asarray(first["frames"][s][0], np.int64), np.asarray(first["frames"][s][1], np.int64))
           for s in sets}
    for x, y in pairs:
        for cell in (x, y):
            if "frames" not in cell or any(
                    not (np.array_equal(cell["frames"][s][0], out[s][0])
                         and np.array_equal(cell["frames"][s][1], out[s][1])
                         and len(cell["inliers"][s]) == out[s][0].sum() and len(cell[s]) == out[s][1].sum())
                    for s in sets):
                raise ConfigError("every cell must be scored on the same frames and sampled pixels; one cell's "
                                  "per-frame samples differ (or it was stored before they were kept: re-evaluate "
                                  "it).")
    if any(out[s][1].sum() == 0 for s in sets):
        raise ConfigError("an anomaly set has no sampled anomaly pixel; nothing to compare on it.")
    return out


def _diff(sa: _Sorted, sb: _Sorted, w_id: np.ndarray, w_ood: np.ndarray, tpr: float) -> dict[str, np.ndarray]:
    ma, mb = sa.metrics(w_id, w_ood, tpr), sb.metrics(w_id, w_ood, tpr)
    return {k: ma[k] - mb[k] for k in ma}
