"""The ``oodtune`` command line: pretrain, import-model, estimate-prior, propose-margins, finetune, evaluate,
benchmark."""

from __future__ import annotations

import os
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from . import __version__
from .data import available_datasets
from .models import ARCHITECTURES
from .progress import console
from .training.batches import CIFAR_MEAN, CIFAR_STD
from .training.trainer import COMPILE_MODES, COMPILE_SCOPES, TrainConfig

SCORE_CHOICES = ("msp", "maxlogit", "entropy", "energy", "odin", "mahalanobis", "knn")
METHODS_HELP = "oe, energy-oe, balanced-energy, sparsity, or a '+'-composition such as balanced-energy+sparsity"


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE.toml``: its keys (dashes or underscores) become this command's defaults."""
    if value:
        try:
            data = tomllib.loads(Path(value).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.BadParameter(f"cannot read config {value}: {exc}") from exc
        section = data.get(ctx.info_name, data)
        # keys are option names (``score``, ``prior``, ``compile``), which may differ from the parameter names
        # click keys its default_map by (``scores``, ``prior_path``, ``compile_mode``)
        names = {o.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params if isinstance(p, click.Option)
                 for o in p.opts if o.startswith("--")}
        names.update({p.name: p.name for p in ctx.command.params if p.name})
        keys = {k: k.replace("-", "_") for k, v in section.items() if not isinstance(v, dict)}
        unknown = sorted(k for k, norm in keys.items() if norm not in names or names[norm] == "config")
        if unknown and ctx.info_name in data:  # top-level keys may be meant for other commands
            raise click.BadParameter(f"{value}: unknown key(s) {', '.join(unknown)} in [{ctx.info_name}].")
        ctx.default_map = {names[norm]: section[k] for k, norm in keys.items() if k not in unknown}
    return value


def config_option(f: Any) -> Any:
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config,
                        is_eager=True, expose_value=False,
                        help="TOML file whose keys set this command's options (a [COMMAND] table or top-level keys).")(f)


def common_options(f: Any) -> Any:
    """Options every data-reading command shares."""
    f = click.option("--data-root", envvar="OODTUNE_DATA", type=click.Path(file_okay=False),
                     help="Folder holding the datasets (official files or archives). Env: OODTUNE_DATA.")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    return f


def train_options(epochs: int, lr: float) -> Any:
    """Optimisation options with per-command defaults."""
    def deco(f: Any) -> Any:
        for opt in reversed([
            click.option("--epochs", type=click.IntRange(1), default=epochs, show_default=True),
            click.option("--lr", type=click.FloatRange(0, min_open=True), default=lr, show_default=True,
                         help="Initial learning rate (cosine-annealed per step)."),
            click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True),
            click.option("--weight-decay", type=float, default=5e-4, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                         help="auto = bf16 autocast on CUDA, fp32 on CPU."),
            click.option("--compile", "compile_mode", default="auto", show_default=True, type=click.Choice(COMPILE_MODES),
                         help="torch.compile mode for the training step (reduce-overhead = CUDA graphs; "
                              "auto = reduce-overhead on CUDA, none on CPU)."),
            click.option("--compile-scope", default="model", show_default=True, type=click.Choice(COMPILE_SCOPES),
                         help="What --compile wraps: the model, or the whole step (crop/flip, normalisation, "
                              "forward, loss) in one graph."),
            click.option("--max-steps-per-epoch", type=click.IntRange(1), default=None,
                         help="Cap steps per epoch (quick CPU-scale runs)."),
        ]):
            f = opt(f)
        return f
    return deco


def _train_config(kw: dict[str, Any], **extra: Any) -> TrainConfig:
    return TrainConfig(
        epochs=kw.pop("epochs"), lr=kw.pop("lr"), batch_size=kw.pop("batch_size"), weight_decay=kw.pop("weight_decay"),
        seed=kw.pop("seed"), precision=kw.pop("precision"), compile=kw.pop("compile_mode"),
        compile_scope=kw.pop("compile_scope"),
        max_steps_per_epoch=kw.pop("max_steps_per_epoch"), device=kw.pop("device"), **extra,
    )


class _Group(click.Group):
    """Reports the library's user-facing errors (bad data, checkpoint, method, existing outputs: all ValueError
    or FileExistsError subclasses) as ``Error: message`` with exit status 1 instead of a traceback.
    ``OODTUNE_DEBUG=1`` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ValueError, FileExistsError, FileNotFoundError) as exc:
            if os.environ.get("OODTUNE_DEBUG", "0") != "0":
                raise
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="oodtune")
def main() -> None:
    """Fine-tune image classifiers to flag out-of-distribution inputs, and measure it properly.

    \b
    Typical workflow:
      oodtune pretrain --dataset cifar10 --arch wrn-40-2 --out runs/pre
      oodtune estimate-prior runs/pre/model.pt --outliers tin-aux --gamma 0.05 --out runs/prior.json
      oodtune finetune runs/pre/model.pt --method balanced-energy --prior runs/prior.json --out runs/bal
      oodtune evaluate runs/bal/model.pt --score energy --ood tin-near --ood dtd --out results/bal
      oodtune benchmark configs/cifar10-offline.toml
    Your own model: `oodtune import-model WEIGHTS.pt --arch mypkg.nets:make_net --out mine.pt`,
    then use mine.pt wherever runs/pre/model.pt appears above.
    Scores are "higher = more in-distribution" everywhere.
    """


@main.command()
def datasets() -> None:
    """List the dataset names that --dataset/--ood/--outliers accept."""
    for name, desc in available_datasets().items():
        click.echo(f"{click.style(f'{name:16s}', bold=True)} {desc}")


@main.command()
@config_option
@common_options
@click.option("--dataset", default="cifar10", show_default=True, help="ID dataset (see `oodtune datasets`).")
@click.option("--arch", default="wrn-40-2", show_default=True,
              help=f"{', '.join(ARCHITECTURES)}, wrn-D-W, or package.module:factory for your own architecture.")
@click.option("--head", default=None, help="Your architecture's classification layer (default: the last nn.Linear).")
@click.option("--imbalance-ratio", type=click.FloatRange(1), default=None,
              help="Make the train split long-tailed with this max/min class ratio (e.g. 100).")
@click.option("--num-train", type=click.IntRange(1), default=None, help="Use a seeded subsample of the train split.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, resume).")
@train_options(epochs=100, lr=0.1)
def pretrain(**kw: Any) -> None:
    """Train a classifier from scratch with cross-entropy (SGD+Nesterov, cosine, crop+flip).

    Interrupted runs resume from OUT/last.pt when started again with the same options.
    """
    from .pipeline import pretrain as run

    cfg = _train_config(kw)
    path = run(kw["out"], dataset=kw["dataset"], arch=kw["arch"], data_root=kw["data_root"], config=cfg,
               imbalance_ratio=kw["imbalance_ratio"], num_train=kw["num_train"], head=kw["head"])
    console.print(f"saved {path}")


@main.command("import-model")
@config_option
@common_options
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--arch", required=True,
              help="Built-in architecture, or package.module:factory where factory(num_classes=K) returns your nn.Module.")
@click.option("--dataset", default="cifar10", show_default=True, help="ID dataset the model was trained on.")
@click.option("--head", default=None, help="Dotted name of the classification layer (default: the last nn.Linear).")
@click.option("--mean", type=(float, float, float), default=CIFAR_MEAN, show_default="CIFAR-10's",
              help="Per-channel mean the model's inputs were normalised with (pixels scaled to [0, 1]).")
@click.option("--std", type=(float, float, float), default=CIFAR_STD, show_default="CIFAR-10's",
              help="Per-channel std the model's inputs were normalised with.")
@click.option("--resolution", type=click.IntRange(8), default=32, show_default=True, help="Input image size.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="oodtune checkpoint to write (.pt).")
@click.option("--check-accuracy/--no-check-accuracy", default=True, show_default=True,
              help="Report the ID test accuracy after import (a wrong --mean/--std or --head shows up here).")
def import_model(weights: str, arch: str, dataset: str, head: str | None, mean: tuple[float, float, float],
                 std: tuple[float, float, float], resolution: int, out: str, check_accuracy: bool,
                 data_root: str | None, device: str) -> None:
    """Wrap a classifier trained elsewhere (its saved state_dict) as an oodtune checkpoint.

    Every other command then works on it: estimate-prior, propose-margins, finetune, evaluate, benchmark.
    """
    from .pipeline import id_test_accuracy
    from .pipeline import import_model as run

    path = run(weights, out, arch=arch, dataset=dataset, data_root=data_root, resolution=resolution, mean=mean,
               std=std, head=head)
    console.print(f"saved {path}")
    if check_accuracy:
        acc = id_test_accuracy(path, data_root=data_root, device=device)
        console.print(f"{dataset} test accuracy of the imported model: {100 * acc:.2f}%")


@main.command("estimate-prior")
@config_option
@common_options
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--outliers", default="tin-aux", show_default=True, help="Auxiliary outlier dataset.")
@click.option("--gamma", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Power applied to the prior before L1 normalisation (Balanced Energy's γ).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the prior (JSON).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also save a bar chart (PNG).")
def estimate_prior(checkpoint: str, outliers: str, gamma: float, out: str, plot: str | None, data_root: str | None,
                   device: str) -> None:
    """Balanced Energy step 1: the outlier class prior P(y|o) as predicted by the pretrained model."""
    from .pipeline import estimate_prior as run
    from .plots import plot_class_prior
    from .training.checkpoint import read_checkpoint

    prior = run(checkpoint, outliers=outliers, data_root=data_root, gamma=gamma, device=device)
    prior.save(out)
    for name, n, p, pg in zip(prior.class_names, prior.counts, prior.probabilities().tolist(),
                              prior.gamma_prior().tolist()):
        click.echo(f"{name:12s} {n:7d}  P={p:.4f}  P_gamma={pg:.4f}")
    if plot:
        meta = read_checkpoint(checkpoint)["meta"]
        plot_class_prior(plot, meta.get("class_counts") or [0] * len(prior.counts), prior.probabilities().tolist(),
                         prior.class_names)
    console.print(f"saved {out}")


@main.command("propose-margins")
@common_options
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--outliers", default="tin-aux", show_default=True)
def propose_margins(checkpoint: str, outliers: str, data_root: str | None, device: str) -> None:
    """Suggest m_in / m_out from the pretrained model's energies on ID train data and outliers."""
    from .margins import margin_coverage
    from .margins import propose_margins as propose
    from .pipeline import pretrained_energies

    e_in, e_out = pretrained_energies(checkpoint, outliers=outliers, data_root=data_root, device=device)
    m_in, m_out = propose(e_in.cpu(), e_out.cpu())
    click.echo(f"ID energy median {e_in.median():.2f}, outlier energy median {e_out.median():.2f}")
    cov_in, cov_out = margin_coverage(e_in, e_out, m_in, m_out)
    click.echo(f"proposed --m-in {m_in:.1f} --m-out {m_out:.1f} "
                  f"(hinges start active on {100 * cov_in:.0f}% of ID and {100 * cov_out:.0f}% of outliers)")


@main.command()
@config_option
@common_options
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--method", required=True, help=METHODS_HELP)
@click.option("--outliers", default="tin-aux", show_default=True, help="Auxiliary outlier dataset (train split).")
@click.option("--prior", "prior_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Outlier prior JSON from `oodtune estimate-prior` (balanced-energy).")
@click.option("--gamma", type=click.FloatRange(0), default=None, help="Override the prior's γ.")
@click.option("--m-in", type=float, default=None, help="In-distribution energy margin (default -23).")
@click.option("--m-out", type=float, default=None, help="Outlier energy margin (default -5).")
@click.option("--alpha", type=float, default=None, help="Balanced Energy margin scale α (default 10).")
@click.option("--energy-weight", type=float, default=None, help="Weight of the energy terms (default 0.1).")
@click.option("--oe-weight", type=float, default=None, help="OE weight λ (default 0.5).")
@click.option("--sparsity-weight", type=float, default=None, help="Sparsity λ (paper 0.001; public code 0.02).")
@click.option("--outlier-batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@train_options(epochs=10, lr=1e-3)
def finetune(**kw: Any) -> None:
    """Fine-tune a pretrained checkpoint with an OOD-aware loss (on the ID *train* split only)."""
    from .pipeline import finetune as run
    from .prior import OutlierPrior

    prior = OutlierPrior.load(kw["prior_path"]) if kw["prior_path"] else None
    if prior is not None and kw["gamma"] is not None:
        prior = OutlierPrior(counts=prior.counts, gamma=kw["gamma"], class_names=prior.class_names)
    names = {"m_in": "m_in", "m_out": "m_out", "alpha": "alpha", "energy_weight": "energy_weight",
             "oe_weight": "oe_weight", "sparsity_weight": "sparsity_weight"}
    loss_options = {k: kw[v] for k, v in names.items() if kw[v] is not None}
    cfg = _train_config(kw, outlier_batch_size=kw["outlier_batch_size"])
    path = run(kw["checkpoint"], kw["out"], method=kw["method"], data_root=kw["data_root"], outliers=kw["outliers"],
               prior=prior, config=cfg, loss_options=loss_options)
    console.print(f"saved {path}")


@main.command()
@config_option
@common_options
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--score", "scores", multiple=True, type=click.Choice(SCORE_CHOICES), default=("msp", "energy"),
              show_default=True, help="Repeat for several scores.")
@click.option("--ood", multiple=True, required=True, help="OOD test set; repeat for several (see `oodtune datasets`).")
@click.option("--num-ood", type=click.IntRange(1), default=None, help="Seeded subsample of each OOD set.")
@click.option("--positive", type=click.Choice(["in", "out"]), default=None,
              help="Which class the metrics treat as positive (default: see oodtune.metrics).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write OUT.json and OUT.md with the table (a .json or .md suffix on OUT is dropped).")
@click.option("--overwrite", is_flag=True, help="Replace existing OUT files.")
def evaluate(checkpoint: str, scores: tuple[str, ...], ood: tuple[str, ...], num_ood: int | None,
             positive: str | None, out: str | None, overwrite: bool, data_root: str | None, device: str) -> None:
    """Accuracy + AUROC / AUPR-In / AUPR-Out / FPR95 for each score on each OOD set."""
    from .pipeline import evaluate_checkpoint
    from .report import markdown_table, write_json, write_text_atomic

    if out and Path(out).suffix in (".json", ".md"):
        out = str(Path(out).with_suffix(""))  # `--out table.json` means table.json + table.md, not table.json.json
    existing = [p for p in (f"{out}.json", f"{out}.md") if out and not overwrite and Path(p).exists()]
    if existing:  # refuse before spending the evaluation
        raise click.ClickException(f"{', '.join(existing)} exists; pass --overwrite or choose another --out.")
    report, meta = evaluate_checkpoint(checkpoint, scores=scores, ood=ood, data_root=data_root, device=device,
                                       num_ood=num_ood, positive=positive)
    rows = report.rows + report.averages()
    table = markdown_table(rows, ["score", "dataset", "auroc", "aupr_in", "aupr_out", "fpr95"])
    command = "oodtune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    click.echo(f"ID accuracy ({meta['dataset']} test): {100 * report.accuracy:.2f}%")
    click.echo(table)
    if out:
        data = {"command": command, "checkpoint": checkpoint, "id_dataset": meta["dataset"],
                "accuracy": 100 * report.accuracy, "rows": rows}
        write_json(f"{out}.json", data, overwrite=overwrite)
        md = f"# {Path(checkpoint).parent.name}\n\nCommand: `{command}`\n\nID accuracy: {100 * report.accuracy:.2f}%\n\n"
        write_text_atomic(f"{out}.md", md + table, overwrite=overwrite)
        console.print(f"wrote {out}.json and {out}.md")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--data-root", envvar="OODTUNE_DATA", type=click.Path(file_okay=False), default=None,
              help="Overrides the config's data_root.")
@click.option("--device", default=None, help="Overrides the config's device.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Overrides the config's out folder.")
@click.option("--only", multiple=True, metavar="METHOD",
              help="Run only this row of the config (label or slug, e.g. 'energyoe'); repeatable. The other "
                   "rows are tabulated from their finished runs.")
@click.option("--report-only", is_flag=True,
              help="Train nothing: tabulate the runs already finished and list the missing ones.")
def benchmark(config: str, data_root: str | None, device: str | None, out: str | None, only: tuple[str, ...],
              report_only: bool) -> None:
    """Run a grid (methods x seeds x OOD sets) from one pretrained checkpoint; resumes if interrupted.

    Writes OUT/results.json, OUT/results.md and plots (energy histograms, ROC curves).
    """
    from .benchmark import load_benchmark_config, run_benchmark

    try:
        cfg = load_benchmark_config(config, data_root=data_root, device=device, out=out, only=list(only))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--only") from err
    paths = run_benchmark(cfg, command="oodtune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                          report_only=report_only)
    console.print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
