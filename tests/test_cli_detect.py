"""The deployment commands end to end (``calibrate``, ``predict``) and the user-facing outputs of pretrain /
finetune / evaluate: held-out validation parts, detectors refused on other checkpoints, per-file error rows,
export, margins "auto", saved scores, provenance, flag names in errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import offline_env, write_corrupt_jpeg, write_image
from helpers_cli import FAST, fails, ok
from oodtune import __version__
from oodtune.cli import cli_message
from oodtune.deploy.export import load_exported
from oodtune.deploy.onnx_export import read_onnx_record
from oodtune.metrics.conformal import benjamini_hochberg

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("cli-detect"), train_per_class=20, test_per_class=10) as e:
        yield e


def _pretrain(env: dict[str, Path], out: str, *extra: Any) -> Path:
    ok("pretrain", "--data-root", env["root"], "--arch", "wrn-10-1", "--resolution", "16", "--out", env["tmp"] / out,
       *FAST, *extra)
    return env["tmp"] / out / "model.pt"


@pytest.fixture(scope="module")
def with_val(env: dict[str, Path]) -> Path:
    return _pretrain(env, "pre-val", "--val-fraction", "0.5")


@pytest.fixture(scope="module")
def detector(env: dict[str, Path], with_val: Path) -> Path:
    out = env["tmp"] / "detector.json"
    res = ok("calibrate", with_val, "--data-root", env["root"], "--device", "cpu", "--tpr", "0.8", "--out", out,
             "--export", env["tmp"] / "detector.pt2")
    assert "calibration images" in res.output and "check on 100 ID test images" in res.output
    return out


def test_pretrain_holds_out_a_validation_part(with_val):
    meta = torch.load(with_val, weights_only=True)["meta"]
    assert meta["val_fraction"] == 0.5 and meta["resolution"] == 16 and meta["source_size"] == 200
    assert sum(meta["class_counts"]) == 100 and {"test_acc", "val_acc"} <= set(meta["history"][0])
    assert (with_val.parent / "history.csv").exists()


def test_calibrate_records_how_the_threshold_was_set(detector, with_val):
    record = json.loads(detector.read_text())
    cal = record["calibration"]
    assert record["score"] == "energy" and record["checkpoint"] == str(with_val.resolve())
    assert cal["n"] == 100 and cal["held_out"] and cal["tpr"] == 0.8 and cal["achieved"] >= 0.8
    assert "validation part held out" in cal["data"] and cal["check"]["n"] == 100
    assert len(record["weights_sha256"]) == 64 and record["oodtune_version"] == __version__
    program, meta = load_exported(detector.with_suffix(".pt2"))
    assert meta["threshold"] == cal["threshold"]
    _, score, is_ood = program(torch.zeros(3, 16, 16, 3, dtype=torch.uint8))
    assert score.shape == (3,) and is_ood.dtype == torch.bool


def test_calibration_data_choices(env, with_val):
    root, tmp = env["root"], env["tmp"]
    fails("calibrate", with_val, "--data-root", root, "--calibration-data", "test", "--out", tmp / "x.json",
          match="must not choose its threshold", code=1)
    res = ok("calibrate", with_val, "--data-root", root, "--device", "cpu", "--calibration-data", "train", "--tpr",
             "0.8", "--no-check", "--out", tmp / "biased.json")
    assert "warning: calibrating on the training images" in res.output
    assert json.loads((tmp / "biased.json").read_text())["calibration"]["held_out"] is False
    without_val = _pretrain(env, "pre-noval")
    fails("calibrate", without_val, "--data-root", root, "--out", tmp / "y.json", match="--val-fraction", code=1)
    fails("calibrate", with_val, "--data-root", root, "--tpr", "0.99", "--out", tmp / "z.json",
          match="at least 1000", code=1)
    empty = tmp / "empty-root"
    empty.mkdir()
    res = fails("calibrate", with_val, "--data-root", empty, "--out", tmp / "w.json", match=f"under {empty}", code=1)
    assert "--data-root" in res.output and "OODTUNE_DATA" in res.output and "--val-fraction" not in res.output
    res = fails("calibrate", without_val, "--data-root", root, "--out", tmp / "y.json", match=f"searched: {root}")
    assert "set it with --data-root or env OODTUNE_DATA" in res.output


def test_calibrate_draws_the_threshold_on_the_histogram(env, with_val):
    plot = env["tmp"] / "calibration.png"
    ok("calibrate", with_val, "--data-root", env["root"], "--device", "cpu", "--tpr", "0.8", "--out",
       env["tmp"] / "d-plot.json", "--plot", plot)
    assert plot.stat().st_size > 0


def test_predict_files_and_refuse_foreign_detector(env, detector, with_val):
    tmp = env["tmp"]
    shots = tmp / "shots"
    for i in range(3):
        write_image(shots / f"{i}.png", (24, 20), seed=i)
    write_corrupt_jpeg(shots / "z-broken.jpg")
    out = tmp / "preds.csv"
    res = ok("predict", with_val, shots, tmp / "nope.png", "--detector", detector, "--out", out, "--device", "cpu")
    assert "5 input(s)" in res.output and "2 unreadable" in res.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "predicted_class", "confidence", "score", "margin", "p_value", "is_ood", "error"]
    threshold = json.loads(detector.read_text())["calibration"]["threshold"]
    for r in rows[:3]:  # margin = score - threshold, negative exactly when flagged
        assert float(r["margin"]) == pytest.approx(float(r["score"]) - threshold, abs=1e-5)
        assert (float(r["margin"]) < 0) == (r["is_ood"] == "True")
    assert rows[3]["margin"] == "" and rows[3]["is_ood"] == ""
    assert [Path(r["path"]).name for r in rows] == ["0.png", "1.png", "2.png", "z-broken.jpg", "nope.png"]
    assert rows[0]["is_ood"] in ("True", "False") and not rows[0]["error"] and "cannot decode" in rows[3]["error"]
    fails("predict", with_val, shots, "--detector", detector, "--out", out, match="--overwrite", code=1)
    ok("predict", with_val, shots / "0.png", "--detector", detector, "--out", tmp / "preds.jsonl")
    line = json.loads((tmp / "preds.jsonl").read_text().splitlines()[0])
    assert set(line) == {"path", "predicted_class", "confidence", "score", "margin", "p_value", "is_ood", "error"}
    assert 0 < line["p_value"] <= 1
    other = _pretrain(env, "pre-other", "--seed", "1")
    fails("predict", other, shots, "--detector", detector, match="calibrate a detector for this checkpoint", code=1)


def test_pretrain_per_epoch_accuracy_on_a_sample_or_none(env):
    res = ok("pretrain", "--data-root", env["root"], "--arch", "wrn-10-1", "--resolution", "16", "--out",
             env["tmp"] / "pre-sample", "--eval-images", "30", *FAST)
    assert "30 of 100 test images" in res.output and "--eval-images" in res.output
    history = torch.load(env["tmp"] / "pre-sample" / "model.pt", weights_only=True)["meta"]["history"]
    assert "test_acc" in history[0] and round(history[0]["test_acc"] * 30, 6) % 1 == 0  # a share of 30 images
    res = ok("pretrain", "--data-root", env["root"], "--arch", "wrn-10-1", "--resolution", "16", "--out",
             env["tmp"] / "pre-none", "--eval-images", "0", *FAST)
    history = torch.load(env["tmp"] / "pre-none" / "model.pt", weights_only=True)["meta"]["history"]
    assert "test_acc" not in history[0] and "no per-epoch accuracy" in res.output


def test_finetune_auto_margins_and_evaluate_outputs(env, with_val):
    root, tmp = env["root"], env["tmp"]
    res = ok("finetune", with_val, "--method", "energy-oe", "--m-in", "auto", "--m-out", "auto", "--data-root", root,
       "--outlier-batch-size", "16", "--out", tmp / "eoe", *FAST)
    assert "energies of the pretrained model on" in res.output and "(seeded samples)" in res.output
    meta = torch.load(tmp / "eoe" / "model.pt", weights_only=True)["meta"]
    margins = meta["loss_options"]
    assert isinstance(margins["m_in"], float) and margins["m_in"] < margins["m_out"]
    assert "proposed from the pretrained model's energies" in meta["notes"]["margins"]
    assert meta["val_fraction"] == 0.5  # fine-tuning keeps the held-out part out
    fails("finetune", with_val, "--method", "energy-oe", "--m-in", "soon", "--out", tmp / "x", match="'auto'")
    fails("finetune", with_val, "--method", "oe", "--m-in", "auto", "--data-root", root, "--out", tmp / "x",
          match="do not apply", code=1)
    res = ok("finetune", with_val, "--method", "energy-oe", "--data-root", root, "--outlier-batch-size", "16",
             "--out", tmp / "eoe-default", *FAST)
    assert "warning: the default margins" in res.output  # a 1-step model is nowhere near WRN-40-2 energies

    out = tmp / "ev"
    res = ok("evaluate", tmp / "eoe" / "model.pt", "--ood", "gaussian", "--ood", "tin-near", "--num-ood", "8",
             "--data-root", root, "--device", "cpu", "--out", out, "--save-scores")
    assert "warning: OOD set tin-near has only 8 images" in res.output
    data = json.loads(Path(f"{out}.json").read_text())
    assert data["oodtune_version"] == __version__ and data["metric_convention"]["positive_class"] == "OOD"
    assert {(r["dataset"], r["n_ood"], r["n_id"]) for r in data["rows"] if "n_ood" in r} == {
        ("gaussian", 8, 100), ("tin-near", 8, 100)}
    with open(f"{out}.csv", newline="") as fh:
        assert {"n_ood", "n_id", "auroc"} <= set(csv.DictReader(fh).fieldnames or [])
    with open(f"{out}-scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 100 + 8 + 8 and set(rows[0]) == {"dataset", "index", "msp", "energy"}
    fails("evaluate", tmp / "eoe" / "model.pt", "--ood", "gaussian", "--save-scores", match="--out")


def test_synthetic_sets_default_to_the_id_test_size(env, with_val):
    res = ok("evaluate", with_val, "--ood", "gaussian", "--data-root", env["root"], "--device", "cpu")
    assert "| 100 | 100 |" in res.output


def test_library_keywords_become_flags():
    assert cli_message("or pass download=True") == "or pass --download"
    assert cli_message("pass head_name='...' naming the layer") == "pass --head NAME naming the layer"
    assert cli_message("load it with resolution=32.") == "load it with --resolution 32."


def test_errors_name_flags(env, with_val, tmp_path):
    res = fails("evaluate", with_val, "--ood", "gaussian", "--data-root", tmp_path, match="--data-root", code=1)
    assert "--download" in res.output and "download=True" not in res.output
    ok("evaluate", "--help")


def test_guarantee_p_values_fdr_and_onnx_from_the_cli(env, with_val):
    tmp, root = env["tmp"], env["root"]
    out = tmp / "guaranteed.json"
    res = ok("calibrate", with_val, "--data-root", root, "--device", "cpu", "--tpr", "0.8", "--confidence", "0.95",
             "--no-check", "--out", out)
    assert "guaranteed: threshold" in res.output and "point estimate: threshold" in res.output
    record = json.loads(out.read_text())
    g = record["guarantee"]
    assert g["confidence"] == 0.95 and g["bound_threshold"] == record["calibration"]["threshold"]
    assert g["bound_threshold"] <= g["point_threshold"] and g["calibration_scores"]["n"] == 100
    fails("calibrate", with_val, "--data-root", root, "--device", "cpu", "--tpr", "0.99", "--confidence", "0.99",
          "--out", tmp / "never.json", match="at least 459 are needed", code=1)
    assert not (tmp / "never.json").exists()

    shots = tmp / "fdr-shots"
    for i in range(6):
        write_image(shots / f"{i}.png", (24, 20), seed=10 + i)
    write_corrupt_jpeg(shots / "z-broken.jpg")
    res = ok("predict", with_val, shots, "--detector", out, "--fdr", "0.1", "--out", tmp / "fdr.jsonl")
    assert "Benjamini-Hochberg at FDR 0.1" in res.output and "1 unreadable" in res.output
    rows = [json.loads(line) for line in (tmp / "fdr.jsonl").read_text().splitlines()]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and rows[-1]["p_value"] is None and rows[-1]["is_ood"] is None
    assert [r["is_ood"] for r in good] == benjamini_hochberg([r["p_value"] for r in good], 0.1).tolist()

    fails("calibrate", with_val, "--data-root", root, "--score", "odin", "--out", tmp / "odin.json", "--export",
          tmp / "odin.onnx", match="input gradients", code=1)
    assert not (tmp / "odin.json").exists()
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ok("export", with_val, "--detector", out, "--out", tmp / "det.onnx")
    assert read_onnx_record(tmp / "det.onnx")["threshold"] == record["calibration"]["threshold"]
    fails("export", with_val, "--detector", out, "--out", tmp / "det.onnx", match="--overwrite", code=1)
    fails("export", with_val, "--detector", out, "--out", tmp / "det2.onnx", "--format", "pt2",
          match="has the onnx suffix; name it with .pt2", code=1)
    fails("export", with_val, "--detector", out, "--out", tmp / "det2.pt2", "--format", "onnx",
          match="has the pt2 suffix", code=1)
    assert not (tmp / "det2.onnx").exists() and not (tmp / "det2.pt2").exists()
    ok("export", with_val, "--detector", out, "--out", tmp / "det.bin", "--format", "onnx")
    assert read_onnx_record(tmp / "det.bin")["threshold"] == record["calibration"]["threshold"]
