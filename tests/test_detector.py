"""The Detector: calibration against the metric definition and its sampling error, every input kind, save/load with
the weights hash, per-file predictions with error rows, and the torch.export artifact against the Python detector."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import write_corrupt_jpeg, write_image
from helpers_training import RESOLUTION, easy_imageset, random_imageset, tiny_net
from oodtune.deploy import Detector
from oodtune.deploy.export import export_detector, load_exported
from oodtune.errors import CheckpointError, ConfigError, DataError, ScoreError
from oodtune.metrics import threshold_at_tpr
from oodtune.models import weights_hash
from oodtune.scores import build_score
from oodtune.utils.runtime import inference_precision

CLASSES = ("c0", "c1", "c2", "c3")


def make_detector(score: str = "energy", seed: int = 0, resolution: int = RESOLUTION) -> Detector:
    return Detector(tiny_net(seed), classes=CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=resolution,
                    score=score, device="cpu")


@pytest.fixture(scope="module")
def calibrated() -> Detector:
    det = make_detector()
    det.calibrate(random_imageset(400, seed=1), tpr=0.9)
    return det


# ------------------------------------------------------------------------------------------- calibration

def test_threshold_is_the_metric_operating_point(calibrated):
    scores = calibrated.score(random_imageset(400, seed=1))
    cal = calibrated.calibrated()
    assert (cal.threshold, cal.achieved) == threshold_at_tpr(scores, 0.9)
    assert cal.achieved >= 0.9 and cal.n == 400 and cal.held_out
    k = math.ceil(0.9 * 400)
    assert cal.expected == pytest.approx(k / 401)
    assert cal.expected_std == pytest.approx(math.sqrt(k * (401 - k) / (401 ** 2 * 402)))


def test_acceptance_on_a_disjoint_split_is_the_requested_rate_within_sampling_error():
    """Calibrate on one sample of an ID distribution, measure on a disjoint other, four times: the acceptance rate
    is the expected k / (n + 1) within 3 standard errors each time, and the z-scores average out near 0."""
    det = make_detector(seed=3, resolution=8)  # 8 px keeps 12,000 forward passes fast
    zs = []
    for seed in range(4):
        cal = det.calibrate(random_imageset(1000, size=8, seed=100 + seed), tpr=0.95,
                            check_images=random_imageset(2000, size=8, seed=200 + seed))
        assert cal.check is not None and cal.check["n"] == 2000
        assert abs(cal.check["z"]) < 3, cal.check
        zs.append(cal.check["z"])
    assert abs(np.mean(zs)) < 3 / math.sqrt(len(zs))


def test_calibration_set_too_small_names_the_minimum():
    det = make_detector()
    with pytest.raises(DataError, match="at least 200"):
        det.calibrate(random_imageset(150), tpr=0.95)
    det.calibrate(random_imageset(60), tpr=0.8)  # 10 / (1 - 0.8) = 50 is enough


def test_uncalibrated_detector_predicts_without_is_ood():
    pred = make_detector().predict(random_imageset(8))
    assert pred.is_ood is None and len(pred) == 8
    with pytest.raises(ConfigError, match="calibrate"):
        make_detector().calibrated()


# ------------------------------------------------------------------------------------------------ inputs

def test_every_input_kind_gives_the_same_scores(calibrated, tmp_path):
    pixels = easy_imageset(3, size=RESOLUTION).images  # (3, 16, 16, 3) uint8
    ref = calibrated.score(pixels)
    paths = []
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    variants = {
        "list of HWC arrays": list(pixels),
        "CHW float tensor in [0, 1]": torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255,
        "CHW uint8 tensor": torch.from_numpy(pixels).permute(0, 3, 1, 2),
        "PIL images": [Image.fromarray(p) for p in pixels],
        "paths": paths,
        "string paths": [str(p) for p in paths],
    }
    for what, images in variants.items():
        np.testing.assert_allclose(calibrated.score(images), ref, rtol=1e-6, atol=1e-6, err_msg=what)
    big = np.asarray(Image.fromarray(pixels[0]).resize((40, 32)))  # resized + centre-cropped like dataset files
    assert calibrated.score(big).shape == (1,)


def test_bad_inputs_are_clear_errors(calibrated):
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        calibrated.score(np.full((RESOLUTION, RESOLUTION, 3), 2.0))
    with pytest.raises(DataError, match="CHW"):
        calibrated.score(np.zeros((3, 16, 17, 5), np.uint8))
    with pytest.raises(DataError, match="cannot use a dict"):
        calibrated.score({"x": 1})


# -------------------------------------------------------------------------------------------- save / load

def test_save_load_roundtrip_and_hash(calibrated, tmp_path):
    model = calibrated.net.model
    path = calibrated.save(tmp_path / "det.json")
    with pytest.raises(FileExistsError, match="--overwrite"):
        calibrated.save(path)
    again = Detector.load(path, model, device="cpu")
    images = random_imageset(16, seed=5)
    a, b = calibrated.predict(images), again.predict(images)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.is_ood, b.is_ood)
    assert again.calibrated() == calibrated.calibrated() and again.calibrated().precision == "fp32"
    other = tiny_net(seed=9).model
    assert weights_hash(other) != weights_hash(model)
    with pytest.raises(CheckpointError, match="calibrate a detector for this checkpoint"):
        Detector.load(path, other)
    with pytest.raises(ConfigError, match="in-memory model"):
        Detector.load(path)  # made from a module, not a checkpoint: the model must be given


def test_fitted_statistics_travel_in_a_sidecar(tmp_path):
    det = make_detector("mahalanobis")
    train = easy_imageset(200, size=RESOLUTION)
    det.fit(train, train.labels, source="easy train")
    det.calibrate(random_imageset(60, seed=2), tpr=0.8)
    det.save(tmp_path / "maha.json")
    assert (tmp_path / "maha.stats.pt").exists()
    again = Detector.load(tmp_path / "maha.json", det.net.model)
    images = random_imageset(10, seed=3)
    np.testing.assert_array_equal(det.score(images), again.score(images))
    assert again.fit_source == "easy train"


@pytest.mark.parametrize("score", ["vim", "react+dice+msp"])
def test_head_reading_and_shaped_scores_save_and_load(score, tmp_path):
    # ViM and the shaping steps read the final layer; a shaped score's state lives in its steps and inner score
    det = make_detector(score)
    train = easy_imageset(200, size=RESOLUTION)
    det.fit(train, train.labels, source="easy train")
    det.calibrate(random_imageset(60, seed=2), tpr=0.8)
    det.save(tmp_path / "det.json")
    again = Detector.load(tmp_path / "det.json", det.net.model)
    images = random_imageset(10, seed=3)
    np.testing.assert_array_equal(det.score(images), again.score(images))
    assert again.threshold == det.threshold
    unfitted = make_detector(score)  # the loaded statistics are what scoring uses, not a refit
    with pytest.raises(ScoreError, match="statistics"):
        unfitted.score(images)


def test_not_a_detector_file(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not an oodtune detector"):
        Detector.load(tmp_path / "x.json", tiny_net().model)


# ------------------------------------------------------------------------------------- files and archives

def test_predict_files_reports_every_input_in_order(calibrated, tmp_path):
    folder = tmp_path / "shots"
    for i in range(3):
        write_image(folder / "sub" / f"{i}.png", (20, 24), seed=i)
    write_corrupt_jpeg(folder / "broken.jpg")
    (folder / "notes.txt").write_text("not an image")  # folders list image files only
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        zf.writestr("a/x.png", buf.getvalue())
        zf.writestr("readme.md", "skip me")
    with tarfile.open(tmp_path / "more.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("y.png")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    specs = [folder, tmp_path / "missing.png", str(tmp_path / "more.*"), tmp_path / "bad.zip", str(tmp_path / "*.none")]
    rows = list(calibrated.predict_files(specs, batch_size=2))
    names = [r["path"] for r in rows]
    assert names == [str(folder / "broken.jpg"), *(str(folder / "sub" / f"{i}.png") for i in range(3)),
                     str(tmp_path / "missing.png"), f"{tmp_path / 'more.tar.gz'}!y.png",
                     f"{tmp_path / 'more.zip'}!a/x.png", str(tmp_path / "bad.zip"), str(tmp_path / "*.none")]
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {str(folder / "broken.jpg"), str(tmp_path / "missing.png"), str(tmp_path / "bad.zip"),
                           str(tmp_path / "*.none")}
    assert "cannot decode" in errors[str(folder / "broken.jpg")]
    assert "no such file" in errors[str(tmp_path / "missing.png")]
    assert "archive" in errors[str(tmp_path / "bad.zip")] and "matches no file" in errors[str(tmp_path / "*.none")]
    good = [r for r in rows if not r["error"]]
    assert all(r["predicted_class"] in CLASSES and 0 < r["confidence"] <= 1 and isinstance(r["is_ood"], bool)
               for r in good)
    # the same file gives the same score as an in-memory prediction of it
    direct = calibrated.score([folder / "sub" / "0.png"])[0]
    assert next(r["score"] for r in good if r["path"].endswith("sub/0.png")) == pytest.approx(float(direct))


# ----------------------------------------------------------------------------------------------- export

@pytest.mark.e2e
@pytest.mark.parametrize("score", ["energy", "msp"])
def test_exported_program_equals_the_python_detector(score, tmp_path):
    det = make_detector(score, seed=4)
    det.calibrate(random_imageset(100, seed=6), tpr=0.5)
    path = export_detector(det, tmp_path / "det.pt2")
    program, record = load_exported(path)
    assert record["threshold"] == det.threshold and record["classes"] == list(CLASSES)
    for n in (1, 7):  # the batch dimension is dynamic
        images = random_imageset(n, seed=10 + n)
        logits, scores, is_ood = program(torch.from_numpy(images.images))
        ref = det.predict(images)
        torch.testing.assert_close(logits.detach().argmax(1).numpy(), ref.labels)
        np.testing.assert_allclose(scores.detach().numpy(), ref.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(is_ood.numpy(), ref.is_ood)


@pytest.mark.e2e
def test_exported_program_loads_with_pytorch_alone(tmp_path):
    det = make_detector(seed=5)
    det.calibrate(random_imageset(60, seed=7), tpr=0.8)
    path = export_detector(det, tmp_path / "det.pt2")
    code = (f"import sys, torch\nprogram = torch.export.load({str(path)!r}).module()\n"
            f"logits, score, is_ood = program(torch.zeros(3, {RESOLUTION}, {RESOLUTION}, 3, dtype=torch.uint8))\n"
            "assert logits.shape == (3, 4) and is_ood.dtype == torch.bool\n"
            "assert not [m for m in sys.modules if m.startswith('oodtune')], 'oodtune was imported'\n")
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_export_refuses_what_it_cannot_capture(tmp_path):
    with pytest.raises(ConfigError, match="calibrate"):
        export_detector(make_detector(), tmp_path / "x.pt2")
    det = make_detector("mahalanobis")
    det.score_fn = build_score("knn", k=1)
    det.calibration = make_detector().calibrate(random_imageset(60), tpr=0.8)
    with pytest.raises(ConfigError, match="cannot be exported"):
        export_detector(det, tmp_path / "x.pt2")


def test_a_threshold_set_in_another_precision_warns_once(calibrated, caplog):
    images = random_imageset(16, seed=5)
    with inference_precision("bf16"):
        det = make_detector()
        det.calibrate(random_imageset(400, seed=1), tpr=0.9)
        low = det.score(images)
    assert det.calibrated().precision == "bf16"
    with caplog.at_level("WARNING"):
        det.predict(images)
        det.predict(images)
    assert sum("set on bf16 scores but this run computes fp32" in r.message for r in caplog.records) == 1
    assert not np.array_equal(low, det.score(images))  # the two precisions do give different scores
