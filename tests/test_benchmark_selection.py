"""Choosing a fine-tuning setting on a validation grid (oodtune.benchmark.selection): the rule, its standard error
over frames, and the [selection] section of the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oodtune.benchmark import load_benchmark_config
from oodtune.benchmark.selection import Candidate, choose
from oodtune.errors import ConfigError
from oodtune.metrics import detection_metrics
from test_benchmark_config import GOOD, error, write


def _row(label: str, shift: float, *, id_value: float = 60.0, frames: bool = True, n_frames: int = 30,
         seed: int = 0, jitter: int | None = None) -> Candidate:
    """A row scored on the same pixel samples as every other row built with the same ``seed``; anomalies shifted
    down by ``shift`` (larger: better separated); ``jitter``: a seed of this row's own frame-level noise."""
    rng = np.random.default_rng(seed)
    fin, fout = [8] * n_frames, [3] * n_frames
    frame = rng.normal(0, 1.0, n_frames)
    s_in = rng.normal(1, 1, sum(fin)) + np.repeat(frame, fin)
    s_out = rng.normal(0.5, 1, sum(fout)) + np.repeat(frame, fout) - shift * (1 + 0.5 * np.repeat(frame, fout))
    if jitter is not None:
        s_out = s_out + np.repeat(np.random.default_rng(jitter).normal(0, 1.0, n_frames), fout)
    value = detection_metrics(s_in, s_out)["auroc"]
    return Candidate(label, (s_in, s_out), (fin, fout) if frames else None, value, id_value)


def test_a_gain_beyond_its_standard_error_chooses_the_better_row() -> None:
    rows = {r.label: r for r in (_row("default", 0.0), _row("better", 1.5), _row("worse", -0.5))}
    out = choose(rows, "default", "auroc")
    assert out["candidate"] == "better" and out["chosen"] == "better"
    assert out["gain"] == pytest.approx(rows["better"].value - rows["default"].value)
    assert 0 < out["gain_se"] < out["gain"]
    assert {r["row"]: r["gain"] for r in out["rows"]}["worse"] < 0


def test_a_gain_within_its_standard_error_keeps_the_default() -> None:
    rows = {r.label: r for r in (_row("default", 0.0, jitter=2), _row("barely", 0.0, jitter=1))}
    out = choose(rows, "default", "auroc")
    assert out["candidate"] == "barely" and out["gain"] > 0
    assert out["gain_se"] > out["gain"] and out["chosen"] == "default"


def test_rows_that_lose_the_id_metric_are_not_eligible() -> None:
    rows = {r.label: r for r in (_row("default", 0.0), _row("better", 1.5, id_value=55.0))}
    out = choose(rows, "default", "auroc", pretrained_id=60.0, id_tolerance=1.0)
    assert out["chosen"] == "default" and out["candidate"] == "default"
    assert {r["row"]: r["eligible"] for r in out["rows"]} == {"default": True, "better": False}
    assert choose(rows, "default", "auroc", pretrained_id=60.0, id_tolerance=5.0)["chosen"] == "better"


def test_a_default_that_loses_the_id_metric_gives_way_to_the_best_eligible_row() -> None:
    rows = {r.label: r for r in (_row("default", 0.2, id_value=58.0), _row("head", 0.0), _row("worse", -0.5))}
    out = choose(rows, "default", "auroc", pretrained_id=60.0, id_tolerance=1.0)
    assert out["default_eligible"] is False and out["gain"] < 0
    assert out["candidate"] == "head" and out["chosen"] == "head"
    nothing = {r.label: r for r in (_row("default", 0.2, id_value=58.0), _row("head", 0.0, id_value=50.0))}
    assert choose(nothing, "default", "auroc", pretrained_id=60.0, id_tolerance=1.0)["chosen"] == "default"


def test_nothing_is_chosen_before_the_default_has_finished() -> None:
    out = choose({"better": _row("better", 1.5)}, "default", "auroc")
    assert out["chosen"] is None and out["rows"][0]["gain"] is None


def test_unpaired_samples_give_no_se_and_keep_the_default() -> None:
    rows = {"default": _row("default", 0.0, frames=False), "better": _row("better", 1.5)}
    out = choose(rows, "default", "auroc")
    assert out["gain_se"] is None and out["chosen"] == "default"
    images = {"default": _row("default", 0.0, frames=False), "better": _row("better", 1.5, frames=False)}
    assert choose(images, "default", "auroc")["chosen"] == "better"  # SE over images


SELECTION = GOOD.replace('''ood_near = ["tin-near"]
ood_far = ["gaussian"]''', '''ood_far = ["tin-near"]''') + '''
[[methods]]
label = "EnergyOE"
method = "energy-oe"
'''


def test_the_selection_section_is_read_and_checked(tmp_path: Path) -> None:
    cfg = load_benchmark_config(write(tmp_path, SELECTION + '\n[selection]\ndefault = "EnergyOE"\nid_tolerance = 1\n'))
    assert cfg.selection is not None
    assert (cfg.selection.default, cfg.selection.dataset, cfg.selection.metric) == ("EnergyOE", "tin-near", "auroc")
    assert cfg.selection.id_tolerance == 1.0
    assert "fine-tuned [[methods]] row" in error(tmp_path, SELECTION + '\n[selection]\ndefault = "MSP"\n')
    assert "one of auroc, aupr_out" in error(tmp_path, SELECTION + '\n[selection]\ndefault = "EnergyOE"\n'
                                                                   'metric = "fpr95"\n')
    assert "not an OOD set" in error(tmp_path, SELECTION + '\n[selection]\ndefault = "EnergyOE"\ndataset = "mnist"\n')
    assert ">= 0 points" in error(tmp_path, SELECTION + '\n[selection]\ndefault = "EnergyOE"\nid_tolerance = -1\n')
    assert "name the held-out one" in error(tmp_path, GOOD + '\n[selection]\ndefault = "Balanced EnergyOE"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_benchmark_config(write(tmp_path, SELECTION + '\n[selection]\ndefault = "EnergyOE"\nmetrc = "auroc"\n'))


def test_selection_md_says_why_the_default_gave_way(tmp_path: Path) -> None:
    from oodtune.benchmark.selection import write_selection

    cfg = load_benchmark_config(write(tmp_path, SELECTION.replace('out = "runs/t"', f'out = "{tmp_path / "o"}"')
                                      + '\n[selection]\ndefault = "EnergyOE"\nid_tolerance = 1\n'))
    rows = {"EnergyOE": _row("EnergyOE", 0.0, id_value=58.0), "Balanced EnergyOE": _row("Balanced EnergyOE", 1.5)}
    write_selection(cfg, rows, 60.0, ["MSP (post-hoc)"], "oodtune benchmark t.toml")
    text = (tmp_path / "o" / "selection.md").read_text()
    assert "**Chosen: Balanced EnergyOE**" in text and "the gain exceeds its SE" in text
    assert "the default loses more than the tolerance in ID acc" in text and "Pending rows: MSP (post-hoc)." in text
    data = json.loads((tmp_path / "o" / "selection.json").read_text())
    assert data["chosen"] == "Balanced EnergyOE" and data["default_eligible"] is False
