"""How the threshold with a guarantee behaves over many calibration draws, and what it costs: for each
calibration size n, ``--draws`` calibration sets of n standard-normal ID scores (the law does not matter: the
acceptance rate of an order statistic is distribution-free), the threshold chosen by ``Guarantee.from_scores``
(the detector's path) with and without ``--confidence``, and the true acceptance rate 1 - F(t) of each.

Columns: k (rank from the top) of the point estimate and of the bound; P(acc >= tpr): the exact coverage of the
bound (Binomial tail) and the share of simulated draws that reached ``--tpr`` (bound, then point estimate); the
mean acceptance of each threshold and the 1 % quantile of the bound's acceptance (its lower tail). Then the false
discovery proportion of Benjamini–Hochberg on conformal p-values (batches of 200, 10 % OOD shifted by -2.5).

    python benchmarks/threshold_guarantee.py                          # tpr 0.95, confidence 0.99, 10,000 draws
    python benchmarks/threshold_guarantee.py --tpr 0.9 --confidence 0.95 --draws 2000
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from _common import print_table
from oodtune.deploy.guarantee import Guarantee
from oodtune.metrics.conformal import benjamini_hochberg, conformal_p_values, coverage


def acceptance(n: int, tpr: float, confidence: float | None, draws: int, rng: np.random.Generator) -> np.ndarray:
    """True acceptance rates of the thresholds chosen on ``draws`` calibration sets of n N(0, 1) scores."""
    return np.array([stats.norm.sf(Guarantee.from_scores(rng.standard_normal(n), tpr, confidence).threshold)
                     for _ in range(draws)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tpr", type=float, default=0.95)
    ap.add_argument("--confidence", type=float, default=0.99)
    ap.add_argument("--draws", type=int, default=10_000)
    ap.add_argument("--sizes", default="100,200,500,1000,5000")
    ap.add_argument("--fdr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        if n < 10 / (1 - args.tpr):
            continue
        g = Guarantee.from_scores(np.arange(n, dtype=float), args.tpr, args.confidence)
        bound = acceptance(n, args.tpr, args.confidence, args.draws, rng)
        point = acceptance(n, args.tpr, None, args.draws, rng)
        rows.append([n, g.point_rank, g.bound_rank, f"{coverage(g.rank, n, args.tpr):.4f}",
                     f"{np.mean(bound >= args.tpr):.4f}", f"{np.mean(point >= args.tpr):.4f}",
                     f"{bound.mean():.4f}", f"{point.mean():.4f}", f"{np.quantile(bound, 1 - args.confidence):.4f}"])
    print_table(f"acceptance of new ID data, tpr {args.tpr}, confidence {args.confidence}, {args.draws} draws each",
                ["n", "k point", "k bound", "P exact", "P bound", "P point", "mean bound", "mean point",
                 f"{1 - args.confidence:.0%} q bound"], rows)
    batches, m, m_ood = min(args.draws, 5000), 200, 20
    fdp, power = np.empty(batches), np.empty(batches)
    for b in range(batches):
        cal = rng.standard_normal(1000)
        scores = np.concatenate([rng.standard_normal(m - m_ood), rng.standard_normal(m_ood) - 2.5])
        flagged = benjamini_hochberg(conformal_p_values(cal, scores), args.fdr)
        fdp[b] = flagged[: m - m_ood].sum() / max(1, flagged.sum())
        power[b] = flagged[m - m_ood :].mean()
    print(f"\nBenjamini-Hochberg at FDR {args.fdr} ({batches} batches of {m}, {m_ood} OOD, n = 1000): mean false "
          f"discovery proportion {fdp.mean():.4f} +- {fdp.std() / np.sqrt(batches):.4f} (bound {args.fdr} * m0 / m = "
          f"{args.fdr * (m - m_ood) / m:.3f}), power {power.mean():.3f}")


if __name__ == "__main__":
    main()
