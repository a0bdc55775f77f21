"""The ``oodtune`` command line, end to end on a tiny offline data root (click's CliRunner, CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import offline_env
from helpers_cli import FAST, fails, ok
from oodtune import __version__
from oodtune.cli import main

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with offline_env(tmp_path_factory.mktemp("cli"), train_per_class=10, test_per_class=4) as e:
        yield e


@pytest.fixture(scope="module")
def pretrained(env: dict[str, Path]) -> Path:
    """`oodtune pretrain --config`: every option from a [pretrain] table (dashes and underscores)."""
    cfg = env["tmp"] / "pretrain.toml"
    cfg.write_text(f'[pretrain]\ndata-root = "{env["root"]}"\narch = "wrn-10-1"\nepochs = 1\nbatch_size = 8\n'
                   f'max-steps-per-epoch = 1\ncompile-scope = "step"\ndevice = "cpu"\nout = "{env["tmp"] / "pre"}"\n\n'
                   '[evaluate]\nood = ["gaussian"]\n')
    res = ok("pretrain", "--config", cfg)
    assert "saved" in res.output
    path = env["tmp"] / "pre" / "model.pt"
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["arch"] == "wrn-10-1" and meta["dataset"] == "cifar10"
    assert meta["train_config"]["batch_size"] == 8 and meta["train_config"]["max_steps_per_epoch"] == 1
    assert meta["train_config"]["compile_scope"] == "step" and meta["train_config"]["compile"] == "auto"
    return path


# ----------------------------------------------------------------------------------------- help etc.

def test_help_for_group_and_every_command():
    res = ok("--help")
    for name in main.commands:
        assert name in res.output
        ok(name, "--help")
    assert set(main.commands) >= {"datasets", "pretrain", "estimate-prior", "propose-margins", "finetune", "evaluate",
                                  "benchmark"}
    assert __version__ in ok("--version").output


def test_datasets_lists_names():
    out = ok("datasets").output
    for name in ("cifar10", "tin-aux", "tin-near", "gaussian"):
        assert name in out


# ------------------------------------------------------------------------------------- end to end

def test_prior_finetune_evaluate(env, pretrained):
    tmp, root = env["tmp"], env["root"]
    ok("estimate-prior", pretrained, "--data-root", root, "--device", "cpu", "--gamma", "0.5",
       "--out", tmp / "prior.json")
    prior = json.loads((tmp / "prior.json").read_text())
    assert prior["gamma"] == 0.5 and len(prior["counts"]) == 10
    ok("finetune", pretrained, "--method", "balanced-energy", "--prior", tmp / "prior.json", "--data-root", root,
       "--outlier-batch-size", "16", "--m-in", "-7", "--out", tmp / "bal", *FAST)
    meta = torch.load(tmp / "bal" / "model.pt", weights_only=True)["meta"]
    assert meta["method"] == "balanced-energy" and meta["stage"] == "finetune"
    assert meta["loss_options"] == {"m_in": -7.0} and meta["prior"]["gamma"] == 0.5
    assert meta["train_config"]["outlier_batch_size"] == 16 and meta["train_config"]["lr"] == 1e-3

    out = tmp / "results" / "bal"
    args = ["evaluate", tmp / "bal" / "model.pt", "--score", "msp", "--score", "energy", "--ood", "tin-near",
            "--ood", "gaussian", "--num-ood", "8", "--data-root", root, "--device", "cpu", "--out", out]
    res = ok(*args)
    assert "ID accuracy" in res.output
    data = json.loads(Path(f"{out}.json").read_text())
    assert data["id_dataset"] == "cifar10" and 0 <= data["accuracy"] <= 100
    pairs = [(r["score"], r["dataset"]) for r in data["rows"]]
    assert pairs == [("msp", "tin-near"), ("msp", "gaussian"), ("energy", "tin-near"), ("energy", "gaussian"),
                     ("msp", "average"), ("energy", "average")]
    md = Path(f"{out}.md").read_text()
    assert "AUROC" in md and "| energy | gaussian |" in md
    assert "FPR95↓ OOD+" in md and "positive class OOD" in md and data["metric_convention"]["positive_class"] == "OOD"

    # refuses to overwrite, before evaluating anything; --overwrite replaces
    Path(f"{out}.json").write_text("{}")
    fails(*args, match="--overwrite", code=1)
    assert Path(f"{out}.json").read_text() == "{}"
    ok(*args, "--overwrite")
    assert json.loads(Path(f"{out}.json").read_text())["rows"]
    # --out with a .json suffix names the same pair of files
    fails(*args[:-1], f"{out}.json", match="--overwrite", code=1)
    ok(*args[:-1], tmp / "results" / "bal2.json", "--positive", "in")
    assert (tmp / "results" / "bal2.json").exists() and (tmp / "results" / "bal2.md").exists()
    assert "FPR95↓ ID+" in (tmp / "results" / "bal2.md").read_text()
    assert not (tmp / "results" / "bal2.json.json").exists()


def _odin_by_hand(net: Any, x: torch.Tensor, std: tuple[float, ...], temperature: float = 1000.0,
                  epsilon: float = 0.0014) -> torch.Tensor:
    """ODIN as the ODIN / energy_ood reference code computes it: cross-entropy of the tempered logits against
    the predicted class, gradient sign (>= 0 -> +1) divided by the per-channel std, a step of epsilon against it,
    max tempered softmax of the perturbed input. ``std=(1, 1, 1)`` is the step in normalised units."""
    x = x.clone().requires_grad_(True)
    logits, _ = net(x)
    loss = torch.nn.functional.cross_entropy(logits / temperature, logits.argmax(1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    step = (grad >= 0).float() * 2 - 1
    step = step / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        out, _ = net(x.detach() - epsilon * step)
        return (out / temperature).softmax(1).amax(1)


def test_odin_steps_in_pixel_units_through_the_cli(env, pretrained):
    """`oodtune evaluate --score odin` perturbs by epsilon / std (pixel units), as the reference code does."""
    from oodtune.data import load_dataset
    from oodtune.data.tensors import Normalizer, to_device_uint8
    from oodtune.metrics import ood_metrics
    from oodtune.models import load_feature_model
    from oodtune.pipeline import evaluate_checkpoint

    root, out = env["root"], env["tmp"] / "odin"
    ok("evaluate", pretrained, "--score", "odin", "--ood", "gaussian", "--num-ood", "8", "--data-root", root,
       "--device", "cpu", "--out", out)
    row = json.loads(Path(f"{out}.json").read_text())["rows"][0]
    net, meta = load_feature_model(pretrained)
    norm = Normalizer(meta.mean, meta.std)
    sets = {"id": load_dataset("cifar10", root, "test"), "gaussian": load_dataset("gaussian", root, "test",
                                                                                     num_images=8)}
    images = {k: norm(to_device_uint8(ds, torch.device("cpu"))) for k, ds in sets.items()}
    ref = {k: _odin_by_hand(net, x, meta.std) for k, x in images.items()}
    unscaled = {k: _odin_by_hand(net, x, (1.0, 1.0, 1.0)) for k, x in images.items()}
    expected = ood_metrics(ref["id"], ref["gaussian"]).as_percent()
    assert row["score"] == "odin" and row["auroc"] == pytest.approx(expected["auroc"], abs=1e-9)
    assert row["fpr95"] == pytest.approx(expected["fpr95"], abs=1e-9)
    # the same path's raw scores equal the reference ones; a step in normalised units would not
    report, _ = evaluate_checkpoint(pretrained, scores=["odin"], ood=["gaussian"], data_root=root, device="cpu",
                                    num_ood=8)
    got = {k: torch.as_tensor(v) for k, v in report.scores["odin"].items()}
    for k in ref:
        err = (got[k] - ref[k]).abs().max().item()
        assert err <= 1e-7, k
        assert (unscaled[k] - ref[k]).abs().max().item() > 100 * max(err, 1e-9), k


def test_evaluate_plots(env, pretrained):
    prefix = env["tmp"] / "plots" / "pre"
    args = ["evaluate", pretrained, "--score", "energy", "--score", "msp", "--ood", "gaussian", "--ood", "tin-near",
            "--num-ood", "8", "--data-root", env["root"], "--device", "cpu", "--plot", prefix, "--roc-log-fpr"]
    ok(*args)
    names = sorted(p.name for p in prefix.parent.iterdir())
    assert names == ["pre-energy-hist.png", "pre-energy-roc.png", "pre-msp-hist.png", "pre-msp-roc.png"]
    assert all((prefix.parent / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    fails(*args, match="--overwrite", code=1)  # nothing replaced silently
    ok(*args, "--overwrite")


def test_evaluate_config_sets_defaults(env, pretrained):
    tmp = env["tmp"]
    cfg = tmp / "eval.toml"
    cfg.write_text(f'[evaluate]\nscore = ["maxlogit"]\nood = ["gaussian"]\nnum-ood = 8\ndata_root = "{env["root"]}"\n'
                   f'device = "cpu"\nout = "{tmp / "cfg-eval"}"\n')
    ok("evaluate", pretrained, "--config", cfg)
    rows = json.loads((tmp / "cfg-eval.json").read_text())["rows"]
    assert [(r["score"], r["dataset"]) for r in rows] == [("maxlogit", "gaussian"), ("maxlogit", "average")]
    # the command line wins over the file
    ok("evaluate", pretrained, "--config", cfg, "--score", "entropy", "--out", tmp / "cfg-eval2")
    rows = json.loads((tmp / "cfg-eval2.json").read_text())["rows"]
    assert {r["score"] for r in rows} == {"entropy"}
    # a typo in the command's own table is reported, not silently ignored
    bad = tmp / "bad.toml"
    bad.write_text('[evaluate]\noods = ["gaussian"]\n')
    fails("evaluate", pretrained, "--config", bad, match="oods", code=2)


# ------------------------------------------------------------------------------------------- errors

def test_missing_checkpoint(env):
    missing = env["tmp"] / "nope" / "model.pt"
    for cmd in (["evaluate", missing, "--ood", "gaussian"], ["finetune", missing, "--method", "oe", "--out", "x"],
                ["estimate-prior", missing, "--out", "p.json"]):
        fails(*cmd, match="does not exist", code=2)


def test_unknown_method(env, pretrained):
    res = fails("finetune", pretrained, "--method", "magic-loss", "--data-root", env["root"], "--out",
                env["tmp"] / "magic", *FAST, match="unknown method", code=1)
    assert "magic-loss" in res.output
    assert not (env["tmp"] / "magic").exists()


def test_balanced_energy_without_prior(env, pretrained):
    fails("finetune", pretrained, "--method", "balanced-energy", "--data-root", env["root"], "--out",
          env["tmp"] / "bal-noprior", *FAST, match="estimate-prior", code=1)
    assert not (env["tmp"] / "bal-noprior" / "model.pt").exists()


def test_unknown_ood_dataset(env, pretrained):
    res = fails("evaluate", pretrained, "--ood", "not-a-dataset", "--data-root", env["root"], "--device", "cpu",
                "--out", env["tmp"] / "bad-ood", match="unknown dataset", code=1)
    assert "not-a-dataset" in res.output
    assert not Path(f"{env['tmp'] / 'bad-ood'}.json").exists()


def test_unknown_score_and_missing_ood(env, pretrained):
    fails("evaluate", pretrained, "--score", "bogus", "--ood", "gaussian", match="bogus", code=2)
    fails("evaluate", pretrained, match="--ood", code=2)
