"""The ONNX detector (oodtune.deploy.onnx_export) against the Python detector on real photographs, for every exportable
score: scores within float32 rounding, the same decisions away from the threshold, a dynamic batch, the detector
record in the metadata, serving with onnxruntime alone, and clean refusals for what cannot be exported. Skipped
when the ``onnx`` extra is not installed; the exports run with the end-to-end tests (``-m e2e``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import matplotlib  # its sample data ships the real photographs used here
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from helpers_training import RESOLUTION, random_imageset, tiny_net
from oodtune.deploy import Detector
from oodtune.deploy.onnx_export import (
    ONNX_OPSET,
    check_onnx,
    export_onnx,
    onnx_refusal,
    read_onnx_record,
    run_onnx,
)
from oodtune.errors import ConfigError
from oodtune.scores import SCORE_NAMES, build_score

CLASSES = ("c0", "c1", "c2", "c3")
PHOTOS = Path(matplotlib.get_data_path()) / "sample_data"
EXPORTABLE = [name for name in SCORE_NAMES if onnx_refusal(build_score(name)) is None]


def _crops(photo: str, n: int, seed: int) -> list[Image.Image]:
    """``n`` random square crops (48..200 px) of a real photograph."""
    img = Image.open(PHOTOS / photo).convert("RGB")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = int(rng.integers(48, min(img.size) + 1 if min(img.size) < 200 else 201))
        x, y = int(rng.integers(0, img.size[0] - size + 1)), int(rng.integers(0, img.size[1] - size + 1))
        out.append(img.crop((x, y, x + size, y + size)))
    return out


@pytest.fixture(scope="module")
def photos() -> dict[str, list[Image.Image]]:
    return {"calibration": _crops("grace_hopper.jpg", 250, 0),
            "check": _crops("grace_hopper.jpg", 60, 1) + _crops("Minduka_Present_Blue_Pack.png", 60, 2)}


def _detector(score: str, photos: dict[str, list[Image.Image]]) -> Detector:
    det = Detector(tiny_net(3), classes=CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=RESOLUTION, score=score,
                   device="cpu")
    if det.score_fn.needs_fit:
        train = random_imageset(300, seed=4)
        det.fit(train, train.labels)
    det.calibrate(photos["calibration"], tpr=0.8, confidence=0.9)
    return det


@pytest.mark.e2e  # each export traces the network (seconds): `pytest -m e2e`
@pytest.mark.parametrize("score", EXPORTABLE)
def test_onnx_detector_equals_the_python_detector_on_photographs(score, photos, tmp_path):
    det = _detector(score, photos)
    path = export_onnx(det, tmp_path / "det.onnx")
    check = check_onnx(det, path, photos["check"])
    scale = max(1.0, float(np.abs(det.score(photos["check"])).max()))
    assert check.n == 120 and check.max_abs_score_diff <= 1e-5 * scale, check
    assert check.decision_mismatches == 0 and check.class_mismatches == 0, check
    assert check.near_threshold < 5, check  # the comparison covers (almost) every image
    print(f"{score}: max |score_onnx - score_python| = {check.max_abs_score_diff:.3g} (scale {scale:.3g})")
    for n in (1, 37):  # dynamic batch
        out = run_onnx(path, np.stack([np.asarray(p.resize((RESOLUTION, RESOLUTION))) for p in photos["check"][:n]]))
        assert out["score"].shape == (n,) and out["is_ood"].dtype == np.bool_ and out["logits"].shape == (n, 4)


@pytest.mark.e2e  # each export traces the network (seconds): `pytest -m e2e`
def test_record_in_the_metadata_and_serving_without_torch(photos, tmp_path):
    det = _detector("energy", photos)
    path = export_onnx(det, tmp_path / "det.onnx")
    record = read_onnx_record(path)
    assert record["opset"] == ONNX_OPSET and record["threshold"] == det.threshold and record["score"] == "energy"
    assert record["classes"] == list(CLASSES) and record["guarantee"]["confidence"] == 0.9
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_onnx(det, path)
    code = ("import sys, json, numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
            "meta = json.loads(s.get_modelmeta().custom_metadata_map['oodtune_detector'])\n"
            f"images = np.zeros((3, {RESOLUTION}, {RESOLUTION}, 3), np.uint8)\n"
            "logits, score, is_ood = s.run(None, {'images': images})\n"
            "assert logits.shape == (3, 4) and is_ood.dtype == bool\n"
            "assert (is_ood == (score < meta['threshold'])).all()\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'oodtune')], 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_what_cannot_be_exported_is_refused_with_the_reason(photos, tmp_path):
    assert set(SCORE_NAMES) - set(EXPORTABLE) == {"odin", "ash-s+energy", "ash-b+energy", "ash-p+energy"}
    with pytest.raises(ConfigError, match="input gradients"):
        export_onnx(_detector("odin", photos), tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="stable sort"):
        export_onnx(_detector("ash-b+energy", photos), tmp_path / "x.onnx")
    uncalibrated = Detector(tiny_net(0), classes=CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3, resolution=RESOLUTION,
                            device="cpu")
    with pytest.raises(ConfigError, match="calibrate"):
        export_onnx(uncalibrated, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a readable ONNX model"):
        run_onnx(tmp_path / "junk.onnx", np.zeros((1, RESOLUTION, RESOLUTION, 3), np.uint8))


@pytest.mark.e2e  # each export traces the network (seconds): `pytest -m e2e`
def test_readme_serving_snippet_runs(photos, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### A promise, a batch, a service", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet, "the README's serving section has no python block"
    monkeypatch.chdir(tmp_path)
    det = _detector("energy", photos)
    export_onnx(det, "det.onnx")
    images = np.stack([np.asarray(p.resize((RESOLUTION, RESOLUTION))) for p in photos["check"][:5]])
    scope = {"images": images}
    exec(compile(snippet.group(1), "README.md", "exec"), scope)  # noqa: S102
    assert scope["record"]["threshold"] == det.threshold
    np.testing.assert_array_equal(scope["is_ood"], det.predict(images).is_ood)
