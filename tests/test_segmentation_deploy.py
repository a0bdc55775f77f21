"""Deploying a segmenter: a pixel threshold calibrated on held-out ID frames (checked against an independent
computation), predictions writing anomaly maps / masks / overlays / JSON Lines rows from the command line and
Python, the exported program against the Python path, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fixtures_segmentation import write_espnet_weights, write_segmentation_root
from helpers_cli import fails, ok
from oodtune import pipeline
from oodtune.data import load_segmentation
from oodtune.deploy.export import load_exported
from oodtune.deploy.map_files import anomaly_png
from oodtune.deploy.pixel_detector import ANOMALY_PNG_ZERO, SegmentationDetector
from oodtune.errors import CheckpointError, ConfigError
from oodtune.models import load_model
from oodtune.utils.runtime import inference_precision


def _spread_weights(path: Path) -> Path:
    """Random ESPNet weights whose last layers are scaled up, so that pixel scores spread (a random ESPNet's
    logits are nearly constant, and a quantile of nearly tied scores tests little)."""
    state = torch.load(path, weights_only=True)
    for k in state:
        if k.startswith("classifier.") and state[k].is_floating_point():
            state[k] = state[k] * 300
    torch.save(state, path)
    return path


@pytest.fixture
def seg(data_env: dict[str, Path]) -> dict[str, Any]:
    write_segmentation_root(data_env["root"])
    weights = _spread_weights(write_espnet_weights(data_env["tmp"] / "espnet.pth"))
    ckpt = pipeline.import_segmenter(weights, data_env["tmp"] / "seg.pt", arch="espnet-camvid", dataset="camvid",
                                     data_root=data_env["root"])
    return {**data_env, "ckpt": ckpt}


def _energy_scores(ckpt: Path, frames: np.ndarray) -> np.ndarray:
    """-E = logsumexp over the 11 CamVid class logits, computed here from the raw network (BGR, its mean/std)."""
    model, meta = load_model(ckpt)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).flip(1).float() / 255.0
    x = (x - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.eval()(x)[:, : meta.num_classes].double()
    return torch.logsumexp(logits, dim=1).numpy()


def test_pixel_threshold_matches_an_independent_quantile(seg: dict[str, Any]) -> None:
    det = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu")
    assert isinstance(det, SegmentationDetector)
    cal = det.calibrated()
    val = load_segmentation("camvid", seg["root"], "val", size=(32, 24))
    scores = _energy_scores(seg["ckpt"], val.images)
    keep = val.labels != 11  # void ignored
    pixels = np.sort(scores[keep])[::-1]
    k = math.ceil(0.9 * pixels.size)
    assert cal.n == pixels.size and cal.frames == len(val) and cal.held_out
    assert cal.threshold == pytest.approx(pixels[k - 1], abs=1e-5)
    assert cal.achieved >= 0.9 and cal.achieved == pytest.approx(np.mean(pixels >= cal.threshold), abs=1e-3)
    test = load_segmentation("camvid", seg["root"], "test", size=(32, 24))
    t_scores = _energy_scores(seg["ckpt"], test.images)[test.labels != 11]
    assert cal.check is not None and cal.check["n"] == t_scores.size and cal.check["frames"] == len(test)
    assert cal.check["acceptance"] == pytest.approx(np.mean(t_scores >= cal.threshold), abs=1e-3)
    assert cal.expected_std > 0 and math.isfinite(cal.check["z"])


def test_calibration_never_uses_the_test_frames(seg: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="must not choose"):
        pipeline.calibrate(seg["ckpt"], data="test", data_root=seg["root"], device="cpu")
    with pytest.raises(ConfigError, match="labelled ID frames"):
        pipeline.calibrate(seg["ckpt"], data="folder:elsewhere", data_root=seg["root"], device="cpu")


def _frames_folder(seg: dict[str, Any]) -> Path:
    """Two Road Anomaly frames (64x32: another aspect than the model's 32x24), a corrupt photo, a text file."""
    folder = seg["tmp"] / "frames"
    folder.mkdir()
    for src in sorted((seg["root"] / "RoadAnomaly_jpg" / "frames").glob("*.jpg")):
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not a frame")
    return folder


@pytest.mark.e2e
def test_cli_calibrate_and_predict_write_maps(seg: dict[str, Any]) -> None:
    det_path, maps = seg["tmp"] / "det.json", seg["tmp"] / "maps"
    res = ok("calibrate", seg["ckpt"], "--data-root", seg["root"], "--device", "cpu", "--tpr", "0.9", "--out",
             det_path, "--export", seg["tmp"] / "det.pt2")
    assert "pixels of 4 frames" in res.output and "check on" in res.output and "ID test frames" in res.output
    record = json.loads(det_path.read_text())
    assert record["task"] == "segmentation" and record["calibration"]["unit"] == "pixels"
    folder = _frames_folder(seg)
    res = ok("predict", seg["ckpt"], folder, "--detector", det_path, "--out", maps, "--device", "cpu")
    assert "2 with anomalous pixels" in res.output or "frame(s)" in res.output
    assert "1 file(s)" in res.output and ".txt 1" in res.output  # the skipped text file is reported
    rows = [json.loads(line) for line in (maps / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["broken.png", "frame0.jpg", "frame1.jpg"]
    bad, good = rows[0], rows[1:]
    assert bad["error"] and "user" not in bad["error"] and "re-download" not in bad["error"]
    assert bad["anomalous_share"] is None and bad["mask"] is None
    scale = record["calibration"]["map_scale"]
    det = SegmentationDetector.load(det_path, seg["ckpt"], device="cpu")
    for row in good:
        assert (row["width"], row["height"]) == (48, 24)  # 64x32 at the model's height 24, width a multiple of 8
        mask = np.asarray(Image.open(row["mask"])) > 0
        coded = np.asarray(Image.open(row["anomaly_map"])).astype(np.int64)
        with inference_precision("auto"):  # the command line's default precision
            pred = det.predict(row["path"])[0]
        assert np.array_equal(mask, pred.mask)  # 16-bit levels: batching may move a level by one
        assert np.abs(coded - anomaly_png(pred.anomaly, scale).astype(np.int64)).max() <= 1
        assert np.array_equal(coded > ANOMALY_PNG_ZERO, mask) or not mask.any()
        assert row["anomalous_share"] == pytest.approx(mask.mean())
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert row["components"] == count and sum(row["component_pixels"]) == mask.sum()
        assert sum(row["class_pixels"].values()) == 48 * 24
        assert Image.open(row["overlay"]).format == "JPEG" and Image.open(row["overlay"]).size == (48, 24)
    fails("predict", seg["ckpt"], folder, "--detector", det_path, "--out", maps, match="not empty")
    fails("predict", seg["ckpt"], folder, "--detector", det_path, "--out", seg["tmp"] / "m2", "--blur",
          match="calibrated without --blur")


def test_npy_maps_hold_the_anomaly_itself(seg: dict[str, Any]) -> None:
    det = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False, blur=True)
    det.save(seg["tmp"] / "det.json")
    frames = seg["root"] / "camvid-segnet" / "test"
    rows = list(pipeline.predict_frames(seg["ckpt"], [str(frames)], detector=seg["tmp"] / "det.json",
                                        out=seg["tmp"] / "maps", map_format="npy"))
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    for r in rows:
        a = np.load(r["anomaly_map"])
        assert a.dtype == np.float32 and a.shape == (24, 32)
        assert np.array_equal(a > 0, np.asarray(Image.open(r["mask"])) > 0)
        assert r["max_anomaly"] == pytest.approx(float(a.max()))


def test_predict_streams_its_inputs(seg: dict[str, Any]) -> None:
    """With batch size 1 the first row comes before the third input is even named."""
    det = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False)
    det.save(seg["tmp"] / "det.json")
    named: list[str] = []
    files = sorted(str(p) for p in (seg["root"] / "camvid-segnet" / "test").glob("*.png"))

    def inputs() -> Any:
        for f in files:
            named.append(f)
            yield f

    rows = pipeline.predict_frames(seg["ckpt"], inputs(), detector=seg["tmp"] / "det.json",  # type: ignore[arg-type]
                                   out=seg["tmp"] / "maps", batch_size=1)
    next(rows)
    assert len(named) <= 2


def test_exported_program_equals_the_python_path(seg: dict[str, Any]) -> None:
    det = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False)
    path = det.export(seg["tmp"] / "det.pt2")
    program, record = load_exported(path)
    assert record["task"] == "segmentation" and record["outputs"] == ["class_map", "anomaly", "mask"]
    camvid = load_segmentation("camvid", seg["root"], "test", size=(32, 24)).images
    road = np.stack(det.frames([str(p) for p in sorted((seg["root"] / "RoadAnomaly_jpg" / "frames").glob("*.jpg"))]))
    for frames in (camvid, road):  # the model's own size, and another aspect ratio
        with torch.no_grad():
            classes, anomaly, mask = program(torch.from_numpy(frames))
        python = det.predict(frames)
        assert np.array_equal(classes.numpy(), np.stack([p.class_map for p in python]))
        expected = np.stack([p.anomaly for p in python])
        assert np.abs(anomaly.numpy() - expected).max() <= 1e-5
        away = np.abs(expected) > 1e-5
        assert np.array_equal(mask.numpy()[away], np.stack([p.mask for p in python])[away])


def test_detectors_stay_with_their_model_and_task(seg: dict[str, Any]) -> None:
    det = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False)
    det.save(seg["tmp"] / "det.json")
    weights = _spread_weights(write_espnet_weights(seg["tmp"] / "other.pth", seed=1))
    other = pipeline.import_segmenter(weights, seg["tmp"] / "o.pt",
                                      arch="espnet-camvid", dataset="camvid", data_root=seg["root"])
    with pytest.raises(CheckpointError, match="other weights"):
        SegmentationDetector.load(seg["tmp"] / "det.json", other)
    from oodtune.deploy.detector import Detector

    with pytest.raises(ConfigError, match="segmentation checkpoint"):
        Detector.load(seg["tmp"] / "det.json", seg["ckpt"])
    fails("predict", seg["ckpt"], seg["root"], "--detector", seg["tmp"] / "det.json", match="give --out FOLDER")


@pytest.mark.e2e
def test_evaluate_plots_score_maps_and_can_skip_the_miou(seg: dict[str, Any]) -> None:
    prefix = seg["tmp"] / "fig"
    args = ("evaluate", seg["ckpt"], "--ood", "road-anomaly", "--score", "energy", "--data-root", seg["root"],
            "--device", "cpu")
    res = ok(*args, "--plot", prefix, "--no-id-metrics")
    assert "mIoU" not in res.output and "AUROC" in res.output
    for name in ("fig-energy-hist.png", "fig-energy-roc.png", "fig-energy-maps-road-anomaly.png"):
        assert (seg["tmp"] / name).stat().st_size > 0
    fails(*args, "--plot", prefix, match="--overwrite")  # the maps are planned outputs too
    res = ok(*args)
    assert "ID mIoU" in res.output and "skip with --no-id-metrics" in res.output


@pytest.mark.parametrize(("field", "value", "named"), [
    (("calibration", "threshold"), float("nan"), "calibration.threshold"),
    (("calibration", "frames"), 0, "calibration.frames"),
    (("input_size",), [32], "input_size"),
    (("channel_order",), "rgba", "channel_order"),
    (("anomaly_png", "levels_per_unit"), "many", "anomaly_png.levels_per_unit"),
    (("blur",), "yes", "blur"),
    (("resolution",), 32, "resolution"),  # a classifier's field has no place in a segmenter's detector
])
def test_a_damaged_segmentation_detector_file_names_the_field(seg: dict[str, Any], field: tuple[str, ...],
                                                              value: Any, named: str) -> None:
    det = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False)
    record = det.record()
    SegmentationDetector.load(det.save(seg["tmp"] / "good.json"))  # the record as written passes
    target = record
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    bad = seg["tmp"] / "bad.json"
    bad.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=f"field '{named}'"):
        SegmentationDetector.load(bad)


def _onnx_vs_python(det: SegmentationDetector, path: Path, frames: np.ndarray) -> float:
    """Max |anomaly_onnx - anomaly_python| on ``frames``, after asserting identical class maps and identical masks
    away from the threshold (|anomaly| > 1e-4)."""
    from oodtune.deploy.onnx_export import run_onnx

    out = run_onnx(path, frames)
    python = det.predict(frames)
    assert np.array_equal(out["class_map"], np.stack([p.class_map for p in python]))
    expected = np.stack([p.anomaly for p in python])
    assert out["anomaly"].dtype == np.float32 and out["anomaly"].shape == expected.shape
    away = np.abs(expected) > 1e-4
    assert away.mean() > 0.99  # the comparison covers (almost) every pixel
    assert np.array_equal(out["mask"][away], np.stack([p.mask for p in python])[away])
    return float(np.abs(out["anomaly"] - expected).max())


@pytest.mark.e2e  # the export traces the network (seconds): `pytest -m e2e`
def test_onnx_segmenter_equals_the_python_path(seg: dict[str, Any]) -> None:
    pytest.importorskip("onnxscript")
    from oodtune.deploy.onnx_export import ONNX_OPSET, export_onnx, read_onnx_record

    det = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False)
    path = export_onnx(det, seg["tmp"] / "det.onnx")
    record = read_onnx_record(path)
    assert record == {**det.program_record(dynamic_width=True), "opset": ONNX_OPSET}  # the width is free
    assert record["calibration"]["threshold"] == det.threshold and record["task"] == "segmentation"
    camvid = load_segmentation("camvid", seg["root"], "test", size=(32, 24)).images
    road = np.stack(det.frames([str(p) for p in sorted((seg["root"] / "RoadAnomaly_jpg" / "frames").glob("*.jpg"))]))
    assert road.shape[1:] == (24, 48, 3)  # another width than the model's 32
    diffs = [_onnx_vs_python(det, path, frames) for frames in (camvid, camvid[:1], road)]
    print(f"max |anomaly_onnx - anomaly_python| = {max(diffs):.3g}")
    assert max(diffs) <= 1e-4
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_onnx(det, path)


def test_an_uncalibrated_segmenter_is_refused_before_the_onnx_export(seg: dict[str, Any]) -> None:
    from oodtune.deploy.onnx_export import export_onnx

    with pytest.raises(ConfigError, match="calibrate"):
        export_onnx(SegmentationDetector.from_checkpoint(seg["ckpt"], device="cpu"), seg["tmp"] / "x.onnx")
    assert not (seg["tmp"] / "x.onnx").exists()


@pytest.mark.e2e  # two exports and a calibration from the command line
def test_cli_writes_a_segmenter_as_onnx(seg: dict[str, Any]) -> None:
    pytest.importorskip("onnxscript")
    from oodtune.deploy.onnx_export import read_onnx_record

    det_path, calibrated, exported = seg["tmp"] / "det.json", seg["tmp"] / "cal.onnx", seg["tmp"] / "exp.onnx"
    ok("calibrate", seg["ckpt"], "--data-root", seg["root"], "--device", "cpu", "--tpr", "0.9", "--no-check",
       "--out", det_path, "--export", calibrated)
    ok("export", seg["ckpt"], "--detector", det_path, "--out", exported)
    det = SegmentationDetector.load(det_path, seg["ckpt"], device="cpu")
    assert read_onnx_record(calibrated) == read_onnx_record(exported)
    assert read_onnx_record(exported)["calibration"] == det.calibrated().to_dict()
    camvid = load_segmentation("camvid", seg["root"], "test", size=(32, 24)).images
    assert _onnx_vs_python(det, exported, camvid) <= 1e-4


def test_bf16_maps_record_their_precision_and_a_mismatch_warns(seg: dict[str, Any],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    frames = load_segmentation("camvid", seg["root"], "test", size=(32, 24)).images
    fp32 = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False)
    with inference_precision("bf16"):
        bf16 = pipeline.calibrate(seg["ckpt"], tpr=0.9, data_root=seg["root"], device="cpu", check=False)
        low = np.stack(bf16.score_maps(frames))
    assert (fp32.calibrated().precision, bf16.calibrated().precision) == ("fp32", "bf16")
    exact = np.stack(fp32.score_maps(frames))
    assert np.allclose(low, _energy_scores(seg["ckpt"], frames), rtol=0.02, atol=0.05)  # bf16 is used ...
    assert not np.array_equal(low, exact)  # ... and is not fp32
    path = bf16.save(seg["tmp"] / "bf16.json")
    again = SegmentationDetector.load(path, seg["ckpt"], device="cpu")
    assert again.calibrated().precision == "bf16"
    with caplog.at_level("WARNING"):
        again.predict(frames)
        again.predict(frames)  # warned once per detector and precision
    assert sum("set on bf16 scores but this run computes fp32" in r.message for r in caplog.records) == 1
    caplog.clear()
    with inference_precision("bf16"), caplog.at_level("WARNING"):
        again.predict(frames)
    assert not caplog.records
    record = json.loads(path.read_text())
    del record["calibration"]["precision"]  # a file of an older version
    (seg["tmp"] / "old.json").write_text(json.dumps(record))
    assert SegmentationDetector.load(seg["tmp"] / "old.json", seg["ckpt"]).calibrated().precision is None
    record["calibration"]["precision"] = "fp16"
    (seg["tmp"] / "bad.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="calibration.precision' must be one of 'fp32', 'bf16'"):
        SegmentationDetector.load(seg["tmp"] / "bad.json", seg["ckpt"])
