"""The deployment surface under hostile or clumsy input: predictions files that a spreadsheet cannot execute, odd
file names and FIFOs as error rows, exit codes, detector files validated field by field, exported programs that
are not ones, calibrate options checked before any work, and calibration / check sets verified disjoint."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import offline_env, write_image
from helpers_cli import FAST, fails, invoke, ok
from helpers_training import random_imageset, tiny_net
from oodtune.cli import EXIT_NONE_PREDICTED, EXIT_SOME_FAILED
from oodtune.deploy import Detector, export_detector, load_exported
from oodtune.errors import ConfigError
from oodtune.report import prediction_lines

CLASSES = ("c0", "c1", "c2", "c3")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("deploy-bad"), train_per_class=20, test_per_class=10) as e:
        yield e


@pytest.fixture(scope="module")
def model(env: dict[str, Path]) -> Path:
    ok("pretrain", "--data-root", env["root"], "--arch", "wrn-10-1", "--resolution", "16", "--out",
       env["tmp"] / "pre", "--val-fraction", "0.5", *FAST)
    return env["tmp"] / "pre" / "model.pt"


@pytest.fixture(scope="module")
def detector(env: dict[str, Path], model: Path) -> Path:
    out = env["tmp"] / "detector.json"
    ok("calibrate", model, "--data-root", env["root"], "--device", "cpu", "--tpr", "0.8", "--no-check", "--out", out)
    return out


def _predict(model: Path, detector: Path, *args: Any) -> Any:
    return invoke("predict", model, *args, "--detector", detector, "--device", "cpu")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------- predict

def test_csv_cells_that_a_spreadsheet_would_execute_are_neutralised() -> None:
    hostile = ["=HYPERLINK(\"http://x\",\"y\").jpg", "+1+2.png", "-2+3.png", "@SUM(A1).png", "\tx.png", "\rx.png"]
    rows = [{"path": p, "predicted_class": "=cmd|' /C calc'!A0", "confidence": 0.5, "score": -3.25,
             "is_ood": False, "error": None} for p in hostile]
    text = "".join(prediction_lines(rows, "csv", Counter()))
    parsed = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["path"] for r in parsed] == ["'" + p for p in hostile]
    assert all(r["predicted_class"] == "'=cmd|' /C calc'!A0" for r in parsed)
    assert all(r["score"] == "-3.25" for r in parsed)  # numbers stay numbers
    lines = [json.loads(line) for line in prediction_lines(rows, "jsonl", Counter())]
    assert [r["path"] for r in lines] == hostile and lines[0]["predicted_class"] == rows[0]["predicted_class"]


@pytest.mark.e2e
def test_a_hostile_file_name_is_escaped_in_the_csv_of_predict(env, model, detector, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "=HYPERLINK(1).png", (20, 20))
    res = _predict(model, detector, "=HYPERLINK(1).png", "--out", tmp_path / "p.csv")
    assert res.exit_code == 0, res.output
    assert _rows(tmp_path / "p.csv")[0]["path"] == "'=HYPERLINK(1).png"
    help_text = ok("predict", "--help").output
    assert "'" in help_text and "spreadsheet" in help_text.lower()


@pytest.mark.e2e
def test_a_non_utf8_file_name_is_an_error_row_and_the_rest_is_predicted(env, model, detector, tmp_path) -> None:
    folder = tmp_path / "shots"
    write_image(folder / "good.png", (20, 20))
    with open(os.fsencode(folder) + b"/bad\xff\xfe.png", "wb") as fh:
        fh.write((folder / "good.png").read_bytes())
    for out in (tmp_path / "p.csv", tmp_path / "p.jsonl"):
        res = _predict(model, detector, folder, "--out", out)
        assert res.exit_code == 0, (res.output, res.exception)
        assert "Traceback" not in res.output
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 2
    bad = next(r for r in rows if "bad" in r["path"])
    assert "\\xff\\xfe" in bad["path"] and "UTF-8" in bad["error"] and not bad["score"]
    assert next(r for r in rows if r["path"].endswith("good.png"))["score"]
    assert _predict(model, detector, folder, "--strict", "--out", tmp_path / "s.csv").exit_code == 3


@pytest.mark.e2e
def test_a_fifo_named_like_an_image_is_an_error_row(env, model, detector, tmp_path) -> None:
    folder = tmp_path / "shots"
    write_image(folder / "good.png", (20, 20))
    os.mkfifo(folder / "x.jpg")
    res = _predict(model, detector, folder, "--out", tmp_path / "p.csv")
    assert res.exit_code == 0, (res.output, res.exception)
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "p.csv")}
    assert set(rows) == {"good.png", "x.jpg"} and rows["good.png"]["score"]
    assert "not a regular file" in rows["x.jpg"]["error"]
    os.mkfifo(tmp_path / "y.zip")  # an "archive" that would block when opened
    res = _predict(model, detector, folder / "x.jpg", tmp_path / "y.zip", "--out", tmp_path / "q.csv")
    assert res.exit_code == 4 and all("not a regular file" in r["error"] for r in _rows(tmp_path / "q.csv"))


@pytest.mark.e2e
def test_exit_codes_when_nothing_or_not_everything_was_predicted(env, model, detector, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    res = _predict(model, detector, tmp_path / "empty", "--out", tmp_path / "e.csv")
    assert res.exit_code == 4 and "no input could be predicted" in res.output
    assert len(_rows(tmp_path / "e.csv")) == 1  # the error row is still written
    res = _predict(model, detector, tmp_path / "nope.png", tmp_path / "nope2.png", "--out", tmp_path / "m.csv")
    assert res.exit_code == 4 and len(_rows(tmp_path / "m.csv")) == 2
    write_image(tmp_path / "good.png", (20, 20))
    assert _predict(model, detector, tmp_path / "good.png", "--out", tmp_path / "g.csv").exit_code == 0
    assert _predict(model, detector, tmp_path / "good.png", "--strict", "--out", tmp_path / "g2.csv").exit_code == 0
    both = (tmp_path / "good.png", tmp_path / "nope.png")
    assert _predict(model, detector, *both, "--out", tmp_path / "b.csv").exit_code == 0
    res = _predict(model, detector, *both, "--strict", "--out", tmp_path / "b2.csv")
    assert res.exit_code == 3 and len(_rows(tmp_path / "b2.csv")) == 2
    help_text = ok("predict", "--help").output
    assert "--strict" in help_text and "Exit status" in help_text
    assert f"{EXIT_SOME_FAILED}  some rows failed" in help_text and f"{EXIT_NONE_PREDICTED}  no input" in help_text


# --------------------------------------------------------------------------------------- detector files

@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    det = Detector(tiny_net(0), classes=CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=16, device="cpu")
    det.calibrate(random_imageset(100, size=16, seed=1), tpr=0.8)
    path = det.save(tmp_path_factory.mktemp("det") / "det.json")
    return path, json.loads(path.read_text())


def _set(record: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    record = json.loads(json.dumps(record))
    *parents, key = dotted.split(".")
    target = record
    for p in parents:
        target = target[p]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return record


_DELETE = object()
DAMAGE = [
    ("calibration.threshold", "abc"), ("calibration.threshold", None), ("weights_sha256", _DELETE),
    ("calibration.n", _DELETE), ("calibration.surprise", 1), ("calibration", [1, 2]), ("version", "two"),
    ("score_state.temperature", "hot"), ("classes", "c0"), ("resolution", -3), ("mean", [0.5, 0.5]),
    ("score", "nonsense"), ("calibration.tpr", 1.5), ("calibration.check", 5), ("statistics", 7),
    ("statistics", "../elsewhere.pt"),
]


@pytest.mark.parametrize(("field", "value"), DAMAGE, ids=[f"{f}={v!r}" for f, v in DAMAGE])
def test_a_damaged_detector_file_names_the_file_and_the_field(saved, tmp_path, field, value) -> None:
    path, record = saved
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_set(record, field, value)))
    with pytest.raises(ConfigError) as info:
        Detector.load(bad, tiny_net(0).model)
    message = str(info.value)
    assert str(bad) in message and field.split(".")[-1] in message, message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_threshold_is_refused_on_load(saved, tmp_path, value) -> None:
    path, record = saved
    bad = tmp_path / "nan.json"
    bad.write_text(json.dumps(_set(record, "calibration.threshold", value)))
    with pytest.raises(ConfigError, match="threshold.*finite"):
        Detector.load(bad, tiny_net(0).model)


@pytest.mark.e2e
def test_a_non_finite_threshold_fails_predict(env, model, detector, tmp_path) -> None:
    record = json.loads(detector.read_text())
    record["calibration"]["threshold"] = math.nan
    (tmp_path / "nan.json").write_text(json.dumps(record))
    write_image(tmp_path / "a.png", (20, 20))
    fails("predict", model, tmp_path / "a.png", "--detector", tmp_path / "nan.json", match="finite", code=1)


@pytest.mark.e2e
def test_loading_a_folder_or_a_broken_export_says_what_was_expected(saved, tmp_path) -> None:
    with pytest.raises(ConfigError, match="is a folder, not a detector file"):
        Detector.load(tmp_path, tiny_net(0).model)
    det = Detector.load(saved[0], tiny_net(0).model)
    good = export_detector(det, tmp_path / "good.pt2").read_bytes()
    (tmp_path / "truncated.pt2").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip at all" * 10)
    torch.save({"x": torch.zeros(2)}, tmp_path / "plain.pt2")
    for name in ("truncated.pt2", "garbage.pt2", "plain.pt2"):
        with pytest.raises(ConfigError, match=f"{name}.*not an exported oodtune detector"):
            load_exported(tmp_path / name)
    with pytest.raises(ConfigError, match="is a folder"):
        load_exported(tmp_path)


# ---------------------------------------------------------------------------------------------- calibrate

def _must_not_run(*_a: Any, **_k: Any) -> None:
    raise AssertionError("calibration ran although an option was invalid")


@pytest.mark.e2e
def test_calibrate_checks_the_export_before_any_work(env, model, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("oodtune.pipeline.calibrate", _must_not_run)
    fails("calibrate", model, "--score", "mahalanobis", "--export", tmp_path / "m.pt2", "--out",
          tmp_path / "maha.json", "--data-root", env["root"], match="cannot be exported", code=1)
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------- calibration vs check set

@pytest.mark.e2e
def test_calibration_images_that_are_also_test_images_are_detected(env, model, tmp_path) -> None:
    from oodtune.models import read_meta
    from oodtune.pipeline import DataSource
    from oodtune.pipeline.classification import id_test_set

    test = id_test_set(read_meta(model), DataSource(env["root"]))
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(60):
        Image.fromarray(test.images[i]).save(folder / f"{i:03d}.png")
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"new{i:03d}.png")
    res = ok("calibrate", model, "--data-root", env["root"], "--device", "cpu", "--tpr", "0.8",
             "--calibration-data", f"images:{folder}", "--out", tmp_path / "d.json")
    assert "60 of the 100 ID test images are also calibration images" in res.output
    check = json.loads((tmp_path / "d.json").read_text())["calibration"]["check"]
    assert check["n"] == 40 and "disjoint" in check["data"] and "60" in check["data"]
    default = json.loads(ok("calibrate", model, "--data-root", env["root"], "--device", "cpu", "--tpr", "0.8",
                            "--out", tmp_path / "v.json").output and (tmp_path / "v.json").read_text())
    assert default["calibration"]["check"]["n"] == 100
    assert "verified" in default["calibration"]["check"]["data"]


def test_readme_and_docs_state_the_exit_codes_and_the_csv_rule() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    deploy = (root / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert f"{EXIT_SOME_FAILED} some rows failed with `--strict`" in readme
    assert f"{EXIT_NONE_PREDICTED} no input could be predicted" in readme
    assert f"| {EXIT_SOME_FAILED} | `--strict` and at least one row failed |" in deploy
    assert f"| {EXIT_NONE_PREDICTED} | no input could be predicted" in deploy
    for text in (readme, deploy):
        assert "leading `'`" in text and "`@`" in text
