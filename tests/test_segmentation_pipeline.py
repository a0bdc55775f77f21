"""Segmentation through the same verbs as classification, on tiny fixtures in the published layouts: import a
(random-weight) ESPNet, estimate the prior, propose margins, fine-tune the last block with PEBAL, evaluate mIoU and
pixel metrics; the benchmark grid and the command line on top."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures_segmentation import FixedSegmenter, TinySegmenter, write_espnet_weights, write_segmentation_root
from helpers_cli import fails, ok
from oodtune import pipeline
from oodtune.benchmark import load_benchmark_config, run_benchmark
from oodtune.benchmark.compare import write_comparisons
from oodtune.errors import CheckpointError, ConfigError, ModelError
from oodtune.metrics.pixel import PixelDetectionCounter
from oodtune.models import RunMeta, load_model, read_meta, trusted_archs
from oodtune.training.config import TrainConfig

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)

FAST = TrainConfig(epochs=1, batch_size=2, outlier_batch_size=1, lr=1e-2, max_steps_per_epoch=2, device="cpu")


@pytest.fixture
def seg_root(data_env: dict[str, Path]) -> dict[str, Path]:
    write_segmentation_root(data_env["root"])
    weights = write_espnet_weights(data_env["tmp"] / "espnet.pth")
    ckpt = pipeline.import_segmenter(weights, data_env["tmp"] / "seg.pt", arch="espnet-camvid", dataset="camvid",
                                     data_root=data_env["root"])
    return {**data_env, "weights": weights, "ckpt": ckpt}


def test_import_records_the_segmentation_meta(seg_root: dict[str, Path]) -> None:
    meta = read_meta(seg_root["ckpt"])
    assert (meta.task, meta.num_classes, meta.extra_channels, meta.ignore_index) == ("segmentation", 11, 1, 11)
    assert meta.input_size == (32, 24) and meta.channel_order == "bgr" and meta.trainable == ("conv", "classifier")
    assert RunMeta.from_dict(meta.to_dict()) == meta
    old = {k: v for k, v in meta.to_dict().items() if k not in ("extra_channels", "input_size", "trainable")}
    assert RunMeta.from_dict({**old, "task": "classification"}).extra_channels == 0  # older dicts still load


def test_import_refuses_weights_that_do_not_fit(seg_root: dict[str, Path]) -> None:
    other = write_espnet_weights(seg_root["tmp"] / "city.pth", outputs=20, arch="espnet")
    with pytest.raises(CheckpointError, match="does not fit --arch espnet-camvid"):
        pipeline.import_segmenter(other, seg_root["tmp"] / "x.pt", arch="espnet-camvid", dataset="camvid",
                                  data_root=seg_root["root"])
    with pytest.raises(ConfigError, match="not a segmentation data set"):
        pipeline.import_segmenter(seg_root["weights"], seg_root["tmp"] / "y.pt", arch="espnet-camvid",
                                  dataset="cifar10", data_root=seg_root["root"])
    with pytest.raises(CheckpointError, match="2 extra outputs"):
        pipeline.import_segmenter(seg_root["weights"], seg_root["tmp"] / "z.pt", arch="espnet-camvid",
                                  dataset="camvid", data_root=seg_root["root"], extra_channels=2)
    user = seg_root["tmp"] / "user.pth"
    torch.save(FixedSegmenter(12).state_dict(), user)
    with pytest.raises(ModelError, match=r"\(B, 11, H, W\).*got \(1, 5, 24, 32\)"):  # outputs vs the classes
        pipeline.import_segmenter(user, seg_root["tmp"] / "u.pt", arch="fixtures_segmentation:FixedSegmenter",
                                  dataset="camvid", data_root=seg_root["root"])
    assert not (seg_root["tmp"] / "z.pt").exists() and not (seg_root["tmp"] / "u.pt").exists()


def test_prior_margins_finetune_and_evaluate(seg_root: dict[str, Path]) -> None:
    root, ckpt = seg_root["root"], seg_root["ckpt"]
    source = pipeline.DataSource(root)
    prior = pipeline.estimate_prior(ckpt, outliers="coco-objects", data_root=source, gamma=3.0)
    assert len(prior.counts) == 11 and sum(prior.counts) > 0
    margins = pipeline.propose_margins(ckpt, outliers="coco-objects", data_root=source)
    assert margins.m_in < margins.m_out
    out = pipeline.finetune(ckpt, seg_root["tmp"] / "run", method="balanced-pebal", data_root=source,
                            outliers="coco-objects", prior=prior, config=FAST, loss_options=margins.as_options())
    before, _ = load_model(ckpt)
    after, meta = load_model(out)
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(k.startswith(("conv.", "classifier.")) for k in changed)  # frozen BN stats too
    assert meta.method == "balanced-pebal" and meta.history[0]["gambler"] > 0
    report, _ = pipeline.evaluate_checkpoint(out, scores=["energy", "msp"], ood=["road-anomaly", "camvid-pasted"],
                                             data_root=source)
    assert set(report.id_metrics) == {"miou", "pixel_accuracy", "miou_classes", "pixel_accuracy_classes"}
    rows = {(r["score"], r["dataset"]): r for r in report.rows}
    assert set(rows) == {(s, d) for s in ("energy", "msp") for d in ("road-anomaly", "camvid-pasted")}
    assert all(0 <= r["auroc"] <= 100 and "siou" in r and 0 <= r["fpr95_in"] <= 100 for r in rows.values())
    assert {d: r["n_ood"] for (s, d), r in rows.items() if s == "energy"} == {"road-anomaly": 2, "camvid-pasted": 4}
    assert report.scores["energy"]["id"].size and report.scores["energy"]["road-anomaly"].size
    with pytest.raises(ConfigError, match="do not apply to segmentation"):
        pipeline.evaluate_checkpoint(out, scores=["knn"], ood=["road-anomaly"], data_root=source)
    with pytest.raises(ConfigError, match="classification checkpoints only"):  # no selection for pixel scores
        pipeline.evaluate_checkpoint(out, scores=["energy"], ood=["road-anomaly"], data_root=source,
                                     validation=pipeline.ValidationSpec(outliers="camvid-pasted"))


def test_a_user_segmenter_fine_tunes_its_named_head(seg_root: dict[str, Path]) -> None:
    weights = seg_root["tmp"] / "tiny.pth"
    torch.save(TinySegmenter(12).state_dict(), weights)
    ckpt = pipeline.import_segmenter(weights, seg_root["tmp"] / "tiny.pt", arch="fixtures_segmentation:TinySegmenter",
                                     dataset="camvid", data_root=seg_root["root"], extra_channels=1,
                                     trainable=("head",))
    meta = read_meta(ckpt)
    assert (meta.channel_order, meta.trainable, meta.extra_channels) == ("rgb", ("head",), 1)
    with trusted_archs("fixtures_segmentation:TinySegmenter"):  # the user names their own architecture again
        out = pipeline.finetune(ckpt, seg_root["tmp"] / "tiny-run", method="pebal", data_root=seg_root["root"],
                                outliers="coco-objects", config=FAST)
        before, after = load_model(ckpt)[0].state_dict(), load_model(out)[0].state_dict()
        changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
        assert changed == {"head.weight", "head.bias"}  # the body, its BatchNorm statistics included, is frozen
        report, _ = pipeline.evaluate_checkpoint(out, scores=["energy"], ood=["road-anomaly"],
                                                 data_root=seg_root["root"])
    assert report.rows and "miou" in report.id_metrics


def test_the_decoder_trains_with_reference_pasting(seg_root: dict[str, Path]) -> None:
    """train_part = decoder, paste_mode = reference: only the decoder changes, its BatchNorm statistics included, and
    the fine-tuned checkpoint records the modules it trained."""
    cfg = FAST.replace(train_part="decoder", paste_mode="reference", paste_share=0.5, outlier_batch_size=2)
    out = pipeline.finetune(seg_root["ckpt"], seg_root["tmp"] / "dec", method="pebal", data_root=seg_root["root"],
                            outliers="coco-objects", config=cfg, loss_options={"smooth_normalization": "sum"})
    before, after = load_model(seg_root["ckpt"])[0].state_dict(), load_model(out)
    changed = {k for k, v in after[0].state_dict().items() if not torch.equal(v, before[k])}
    assert changed and not any(k.startswith("encoder.") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # the decoder's BatchNorm layers train
    assert after[1].trainable == ("level3_C", "br", "conv", "up_l3", "combine_l2_l3", "up_l2", "classifier")
    assert after[1].train_config["paste_mode"] == "reference"


def test_pebal_needs_an_abstention_channel(seg_root: dict[str, Path]) -> None:
    weights = write_espnet_weights(seg_root["tmp"] / "k11.pth", outputs=11)
    ckpt = pipeline.import_segmenter(weights, seg_root["tmp"] / "k11.pt", arch="espnet-camvid", dataset="camvid",
                                     data_root=seg_root["root"])
    with pytest.raises(ConfigError, match="abstention"):
        pipeline.finetune(ckpt, seg_root["tmp"] / "r", method="pebal", data_root=seg_root["root"],
                          outliers="coco-objects", config=FAST)


def test_benchmark_grid_and_command_line(seg_root: dict[str, Path]) -> None:
    tmp = seg_root["tmp"]
    config = tmp / "seg.toml"
    config.write_text(f"""
[benchmark]
id_dataset = "camvid"
pretrained = "{seg_root['ckpt']}"
ood_far = ["road-anomaly"]
seeds = [0]
out = "{tmp / 'bench'}"
device = "cpu"
blur = "both"
[finetune]
epochs = 1
max_steps_per_epoch = 1
batch_size = 2
outlier_batch_size = 1
[[methods]]
label = "Energy"
method = "energy"
[[methods]]
label = "MSP"
method = "msp"
[[methods]]
label = "PEBAL"
method = "pebal"
m_in = "auto"
m_out = "auto"
train_part = "decoder"
paste_mode = "reference"
smooth_normalization = "sum"
[selection]
default = "PEBAL"
id_tolerance = 100
[[comparisons]]
better = "PEBAL"
than = "Energy"
""")
    cfg = load_benchmark_config(config, data_root=str(seg_root["root"]))
    assert cfg.task == "segmentation" and cfg.outliers == "coco-objects"
    assert cfg.train_config("finetune", cfg.methods[2], 0).lr == 1e-5  # the segmentation recipe underneath
    calls: list[bool] = []
    real = pipeline.evaluate_checkpoint

    def spy(*a: Any, **k: Any) -> Any:
        calls.append(bool(k.get("blur")))
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "evaluate_checkpoint", spy)
        run_benchmark(cfg, "test")
    assert calls and not any(calls)  # the blurred rows came from the plain maps' forward passes
    results = json.loads((tmp / "bench" / "results.json").read_text())
    rows = {r["method"]: r for r in results["summary"]}
    assert set(rows) == {m + b for m in ("Energy", "MSP", "PEBAL") for b in ("", " +blur")}
    assert "miou" in rows["PEBAL"] and rows["PEBAL +blur"]["miou"] == rows["PEBAL"]["miou"]  # blur: scores only
    assert cfg.train_config("finetune", cfg.methods[2], 0).train_part == "decoder"
    assert list((tmp / "bench" / "evals").rglob("road-anomaly*-blur.json"))
    selection = json.loads((tmp / "bench" / "selection.json").read_text())
    assert selection["chosen"] == "PEBAL" and [r["row"] for r in selection["rows"]] == ["PEBAL"]
    assert "**Chosen: PEBAL**" in (tmp / "bench" / "selection.md").read_text()
    assert "sample_frames" not in json.dumps(results)  # the frame counts stay in the evaluation store
    assert {r["n"] for r in results["per_set"]} == {2}  # the fixture's Road Anomaly frames
    stored = list((tmp / "bench" / "evals").rglob("road-anomaly-nall.json"))  # every plain stored row
    assert stored
    for row_path in stored:
        frames = json.loads(row_path.read_text())["sample_frames"]
        plain = np.load(row_path.with_suffix(".npy"))
        assert sum(frames["out"]) == len(plain)
        assert sum(frames["in"]) == len(np.load(row_path.with_name("road-anomaly-nall-inliers.npy")))
        assert len(frames["in"]) == len(frames["out"]) > 0
        blurred = row_path.with_name("road-anomaly-nall-blur.npy")  # the blurred maps' samples, stored apart
        assert blurred.exists() and row_path.with_name("road-anomaly-nall-blur-inliers.npy").exists()
        assert not np.array_equal(np.load(blurred), plain)
        older = json.loads(row_path.read_text())
        assert older.pop("n_ood") == 2
        row_path.write_text(json.dumps(older))  # as stored before rows carried their frame count
    run_benchmark(cfg, "test", report_only=True)
    results = json.loads((tmp / "bench" / "results.json").read_text())
    assert {r["n"] for r in results["per_set"]} == {2}  # counted from the stored per-frame samples
    assert "mIoU" in (tmp / "bench" / "results.md").read_text()
    assert "the % of inlier pixels flagged" in (tmp / "bench" / "results.md").read_text()  # pixel conventions
    assert (tmp / "bench" / "maps-pebal.png").exists() and (tmp / "bench" / "roc-pebal.png").exists()
    bad = tmp / "bad.toml"
    bad.write_text(config.read_text().replace('method = "msp"', 'method = "knn"'))
    with pytest.raises(ConfigError, match="not a pixel score"):
        load_benchmark_config(bad)
    nopre = tmp / "nopre.toml"
    nopre.write_text("\n".join(ln for ln in config.read_text().splitlines() if not ln.startswith("pretrained")))
    with pytest.raises(ConfigError, match="needs pretrained"):
        load_benchmark_config(nopre)
    write_comparisons(cfg, "test", n_boot=50)  # frames of Road Anomaly, their sampled pixels, drawn together
    compared = json.loads((tmp / "bench" / "comparisons.json").read_text())
    assert {r["metric"] for r in compared["rows"]} == {"auroc", "aupr_out", "fpr95", "fpr95_in"}
    assert {r["group"] for r in compared["rows"]} == {"all"}  # one set, far only: "far" would repeat "all"
    assert all(r["difference"] is not None and r["low"] <= r["high"] for r in compared["rows"])
    assert "frames of each anomaly set" in (tmp / "bench" / "comparisons.md").read_text()
    matrix = tmp / "matrix.toml"
    matrix.write_text(config.read_text() + '\n[matrix]\nscores = ["energy", "msp"]\n')
    with pytest.raises(ConfigError, match="classification benchmarks only"):
        load_benchmark_config(matrix)


def test_one_pass_measures_the_plain_and_the_blurred_maps(seg_root: dict[str, Path]) -> None:
    def evaluate(**kw: Any) -> Any:
        return pipeline.evaluate_checkpoint(seg_root["ckpt"], scores=["energy", "msp"], ood=["road-anomaly"],
                                            data_root=seg_root["root"], device="cpu", **kw)[0]

    both, plain, blurred = evaluate(also_blurred=True), evaluate(), evaluate(blur=True)
    assert both.blurred is not None and plain.blurred is None
    for got, want in ((both, plain), (both.blurred, blurred)):
        assert got.rows == want.rows and got.id_metrics == want.id_metrics
        for score in ("energy", "msp"):
            for key in ("road-anomaly", "id"):
                np.testing.assert_array_equal(got.scores[score][key], want.scores[score][key])
            np.testing.assert_array_equal(got.sample_inliers[score]["road-anomaly"],
                                          want.sample_inliers[score]["road-anomaly"])
    assert both.rows != both.blurred.rows


def test_command_line_import_and_evaluate(seg_root: dict[str, Path]) -> None:
    root, tmp = seg_root["root"], seg_root["tmp"]
    res = ok("import-model", seg_root["weights"], "--arch", "espnet-camvid", "--dataset", "camvid", "--input-size",
             "16x16", "--data-root", root, "--out", tmp / "cli.pt", "--device", "cpu", "--precision", "fp32")
    assert "test mIoU of the imported model: " in res.output  # float32: the published models' numbers
    res = ok("import-model", seg_root["weights"], "--arch", "espnet-camvid", "--dataset", "camvid", "--input-size",
             "16x16", "--data-root", root, "--out", tmp / "cli-bf16.pt", "--device", "cpu", "--precision", "bf16")
    assert "test mIoU of the imported model (bf16; --precision fp32" in res.output
    assert read_meta(tmp / "cli.pt").input_size == (16, 16)
    res = ok("evaluate", tmp / "cli.pt", "--score", "energy", "--ood", "road-anomaly", "--data-root", root,
             "--device", "cpu")
    assert "ID mIoU (camvid test, argmax over all outputs)" in res.output and "sIoU" in res.output
    assert "ID mIoU (camvid test, argmax over the classes only)" in res.output
    assert "| frames |" in res.output and "n ID" not in res.output  # pixel rows: the set's frames, no ID test set
    blurred = ok("evaluate", tmp / "cli.pt", "--score", "energy", "--ood", "road-anomaly", "--blur", "--data-root",
                 root, "--device", "cpu")
    assert blurred.output != res.output
    made: list[bool] = []
    real_init = PixelDetectionCounter.__init__

    def spy(self: PixelDetectionCounter, *a: Any, **k: Any) -> None:
        made.append(bool(k.get("exact", False)))
        real_init(self, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(PixelDetectionCounter, "__init__", spy)
        ok("evaluate", tmp / "cli.pt", "--score", "energy", "--ood", "road-anomaly", "--exact", "--no-id-metrics",
           "--data-root", root, "--device", "cpu", "--out", tmp / "exact")
    assert made and all(made)
    rows = [r for r in json.loads((tmp / "exact.json").read_text())["rows"] if r["dataset"] == "road-anomaly"]
    assert len(rows) == 1 and rows[0]["auroc_bound"] == 0 and rows[0]["ap_bound"] == 0
    fails("import-model", seg_root["weights"], "--arch", "espnet-camvid", "--dataset", "camvid", "--input-size",
          "12x12", "--data-root", root, "--out", tmp / "odd.pt", match="divisible by 8")
    fails("finetune", tmp / "cli.pt", "--method", "oe", "--data-root", root, "--out", tmp / "r",
          match="unknown segmentation method")
