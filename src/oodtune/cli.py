"""The ``oodtune`` command line: pretrain, import-model, estimate-prior, propose-margins, finetune, evaluate,
benchmark, and the deployment commands calibrate (a detector's threshold on held-out ID data) and predict (per
image, on files, folders, globs and archives).

Choices and defaults come from the library (score names, methods, training recipes, loss-term defaults), so the
help never disagrees with what runs. User mistakes (every :class:`~oodtune.errors.OodtuneError`, missing or
existing files) print ``Error: message`` with the library's keywords rewritten as flags; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import sys
import tomllib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .data import available_datasets
from .data.segmentation import parse_size
from .errors import OodtuneError
from .losses.options import LOSS_OPTIONS
from .losses.prior import DEFAULT_GAMMA
from .losses.registry import TASK_LOSSES, option_help
from .models import ARCHITECTURES, trusted_archs
from .models.imported import is_import_path
from .pipeline.classification import EPOCH_EVAL_IMAGES
from .scores import SCORE_NAMES
from .training.config import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    FINETUNE,
    LR_SCHEDULES,
    PASTE_MODES,
    PRETRAIN,
    SEGMENTATION_FINETUNE,
    TrainConfig,
)
from .utils.atomic import check_writable
from .utils.memory import keep_freed_memory
from .utils.progress import ConsoleHandler, console
from .utils.runtime import (
    PRECISIONS,
    current_inference_precision,
    inference_precision,
    resolve_device,
    resolve_precision,
    set_threads,
)

METHODS_HELP = "; ".join(f"{task}: {r.methods_help}" for task, r in TASK_LOSSES.items())
OUTLIERS_HELP = "Auxiliary outlier dataset [default: tin-aux for classification, coco-objects for segmentation]."
#: Library keywords in error messages -> the flag a command-line user types instead.
CLI_WORDS = [
    (re.compile(r"\boverwrite=True\b"), "--overwrite"),
    (re.compile(r"\(argument root=, or env OODTUNE_DATA\)"), "(--data-root, or env OODTUNE_DATA)"),
    (re.compile(r"\bset with data_root= or env OODTUNE_DATA\b"), "set it with --data-root or env OODTUNE_DATA"),
    (re.compile(r"\bdata_root=(\.\.\.)?"), "--data-root"),
    (re.compile(r"\bpass download=True\b"), "pass --download"),
    (re.compile(r"\bhead_name=('\.\.\.')?"), "--head NAME"),
    (re.compile(r"\bresolution=(\d+)"), r"--resolution \1"),
]


#: ``predict`` exit statuses beyond click's 0 (success), 1 (error) and 2 (usage error); ``predict --help`` and the
#: README list them (test_deploy_bad_input checks the help against these values).
EXIT_SOME_FAILED, EXIT_NONE_PREDICTED = 3, 4


def cli_message(message: str) -> str:
    """``message`` with the library's parameter names replaced by this CLI's flags."""
    for pattern, flag in CLI_WORDS:
        message = pattern.sub(flag, message)
    return message


def _option_names(command: click.Command) -> dict[str, str]:
    """Option spellings (``score``, ``compile``) -> click parameter names (``scores``, ``compile_mode``)."""
    names = {o.lstrip("-").replace("-", "_"): str(p.name) for p in command.params if isinstance(p, click.Option)
             for o in p.opts if o.startswith("--")}
    names.update({str(p.name): str(p.name) for p in command.params if p.name})
    return names


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE.toml``: its keys (dashes or underscores) become this command's defaults.

    Keys in a ``[COMMAND]`` table must be options of that command; top-level keys must be options of *some*
    oodtune command (those of other commands are ignored, so one file can serve several commands)."""
    if not value:
        return value
    try:
        data = tomllib.loads(Path(value).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read config {value}: {exc}") from exc
    command = ctx.command
    section = data.get(str(ctx.info_name), data)
    if not isinstance(section, dict):
        raise click.BadParameter(f"{value}: [{ctx.info_name}] must be a table of options, got {section!r}.")
    names = _option_names(command)
    keys = {k: k.replace("-", "_") for k, v in section.items() if not isinstance(v, dict)}
    unknown = sorted(k for k, norm in keys.items() if norm not in names or names[norm] == "config")
    if unknown and ctx.info_name in data:
        raise click.BadParameter(f"{value}: unknown key(s) {', '.join(unknown)} in [{ctx.info_name}]; "
                                 f"options of `oodtune {ctx.info_name}`: {', '.join(sorted(set(names) - {'config'}))}.")
    if unknown:
        everywhere = {n for c in main.commands.values() for n in _option_names(c)}
        stray = [k for k in unknown if keys[k] not in everywhere]
        if stray:
            raise click.BadParameter(f"{value}: key(s) {', '.join(stray)} are options of no oodtune command "
                                     "(misspelled?).")
    params = {str(p.name): p for p in command.params}
    for k, norm in keys.items():  # click would truncate 1.7 to 1 for an integer option
        param, given = params.get(names.get(norm, "")), section[k]
        if isinstance(param, click.Option) and isinstance(param.type, click.types.IntParamType) and \
                not (isinstance(given, int) and not isinstance(given, bool)):
            raise click.BadParameter(f"{value}: {k} = {given!r} must be an integer.")
    for k, norm in keys.items():  # a file never makes oodtune import code (see oodtune.models.imported)
        if norm == "trust_arch" or (norm == "arch" and isinstance(section[k], str) and is_import_path(section[k])):
            raise click.BadParameter(f"{value}: {k} = {section[k]!r} must be given on the command line, not in a "
                                     "file: a file never makes oodtune import code.")
    ctx.default_map = {names[norm]: section[k] for k, norm in keys.items() if k not in unknown}
    return value


def config_option(f: Any) -> Any:
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config,
                        is_eager=True, expose_value=False,
                        help="TOML file whose keys set this command's options (a [COMMAND] table or top-level "
                             "keys).")(f)


def _device(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--device``: an unknown name or a device this machine lacks is refused before any work."""
    try:
        resolve_device(value)
    except OodtuneError as exc:
        raise click.BadParameter(str(exc), param=param) from None
    return value


PRECISION_HELP = ("auto = bf16 autocast + channels_last on CUDA and on CPUs with native bf16 (AMX-BF16 or "
                  "AVX512-BF16), else fp32. Scores and metrics are computed in fp32/fp64 either way.")
THREADS_HELP = ("CPU threads of this process [default: OMP_NUM_THREADS, else the CPUs it may use (affinity, cgroup "
                "quota)]. Running several processes at once, give each its share: 1 each for as many processes as "
                "cores.")


def threads_option(f: Any) -> Any:
    """``--threads N``: the process's intra-op threads (:func:`oodtune.utils.runtime.set_threads`), set before the
    command runs; with ``--precision`` among the command's options, its forward passes that score run in it. Freed
    memory stays in the process (:func:`oodtune.utils.memory.keep_freed_memory`)."""
    @functools.wraps(f)
    def run(*args: Any, threads: int | None, **kw: Any) -> Any:
        keep_freed_memory()
        try:
            set_threads(threads)
        except OodtuneError as exc:
            raise click.BadParameter(str(exc), param_hint="--threads") from None
        precision = kw.pop("inference_precision", None) or kw.get("precision") or "auto"
        with inference_precision(precision):
            return f(*args, **kw)

    return click.option("--threads", type=click.IntRange(1), default=None, help=THREADS_HELP)(run)


def precision_option(f: Any) -> Any:
    """``--precision`` of a command that only runs forward passes (the wrapper of :func:`threads_option` uses it)."""
    return click.option("--precision", "inference_precision", type=click.Choice(PRECISIONS), default="auto",
                        show_default=True, help=PRECISION_HELP)(f)


def common_options(f: Any) -> Any:
    """Options every data-reading command shares; the command receives ``data_root`` as a DataSource."""
    @functools.wraps(f)
    def with_source(*args: Any, data_root: str | None, download: bool, **kw: Any) -> Any:
        from .pipeline import DataSource

        return f(*args, data_root=DataSource(data_root, download=download), **kw)

    g = threads_option(with_source)
    g = click.option("--data-root", envvar="OODTUNE_DATA", type=click.Path(file_okay=False),
                     help="Folder holding the datasets (official files or archives) [default: env OODTUNE_DATA, "
                          "else ./data].")(g)
    g = click.option("--download", is_flag=True,
                     help="Download official archives that are missing from the data root (CIFAR-10/100).")(g)
    return click.option("--device", default="auto", show_default=True, callback=_device,
                        help="auto, cpu, cuda or cuda:N.")(g)


def id_data_option(f: Any) -> Any:
    return click.option("--id-data", default=None, metavar="DATASET",
                        help="The checkpoint's ID dataset under another name or path (e.g. folder:NEW/PATH after "
                             "moving it); its classes must match.")(f)


def trust_option(f: Any) -> Any:
    """``--trust-arch MODULE:FACTORY`` (repeatable): the command runs inside ``trusted_archs(...)``."""
    @functools.wraps(f)
    def run(*args: Any, trust_arch: tuple[str, ...] = (), **kw: Any) -> Any:
        try:
            scope = trusted_archs(*trust_arch)
        except OodtuneError as exc:
            raise click.BadParameter(str(exc), param_hint="--trust-arch") from None
        with scope:
            return f(*args, **kw)

    return click.option("--trust-arch", multiple=True, metavar="MODULE:FACTORY",
                        help="Your own architecture: allow a checkpoint (or benchmark config) naming this import path "
                             "to import and run it. Repeatable. oodtune never imports code because a file names "
                             "it.")(run)


def pretrained_and_outliers(f: Any) -> Any:
    """The data options, ``--trust-arch``, the CHECKPOINT argument and ``--outliers`` of the steps that run a
    pretrained model over auxiliary outliers (estimate-prior, propose-margins)."""
    f = click.option("--outliers", default=None, help=OUTLIERS_HELP)(f)
    f = click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))(f)
    return common_options(trust_option(f))


def check_output_file(path: str | Path, overwrite: bool = False) -> None:
    """Before any work: an existing ``path`` (unless ``overwrite``) and an unwritable folder are refused."""
    if Path(path).exists() and not overwrite:
        raise click.ClickException(f"{path} exists; pass --overwrite or choose another --out.")
    check_writable(Path(path).parent, "choose another --out")


def _finite(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (value == value and abs(value) != float("inf")):
        raise click.BadParameter(f"must be a finite number, got {value}", param=param)
    return value


def _finite_or_auto(ctx: click.Context, param: click.Parameter, value: str | None) -> float | str | None:
    if value is None or value == "auto":
        return value
    try:
        return _finite(ctx, param, float(value))
    except ValueError:
        raise click.BadParameter(f"must be a number or 'auto', got {value!r}", param=param) from None


def train_options(defaults: TrainConfig, *, shown: bool) -> Callable[[Any], Any]:
    """Optimisation options. ``shown``: the defaults are ``defaults`` (pretraining); otherwise every option
    defaults to "not given" and the checkpoint's task recipe applies (its values for classification are shown)."""
    def default(name: str) -> Any:
        return getattr(defaults, name) if shown else None

    def note(name: str) -> str:
        return "" if shown else f" [default: {getattr(defaults, name)} for classification]"

    def deco(f: Any) -> Any:
        for opt in reversed([
            click.option("--epochs", type=click.IntRange(1), default=default("epochs"), show_default=shown,
                         help="Training epochs." + note("epochs")),
            click.option("--lr", type=click.FloatRange(0, min_open=True), default=default("lr"), show_default=shown,
                         callback=_finite, help="Initial learning rate (decayed per step: --lr-schedule)."
                         + note("lr")),
            click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=default("lr_schedule"),
                         show_default=shown,
                         help="Per-step decay: cosine (OE / Energy code, to 1e-6) or poly (PEBAL's, (1 - t/T)^0.9)."
                              + ("" if shown else f" [default: cosine for classification, "
                                                  f"{SEGMENTATION_FINETUNE.lr_schedule} for segmentation]")),
            click.option("--batch-size", type=click.IntRange(1), default=default("batch_size"), show_default=shown,
                         help="ID images per step." + note("batch_size")),
            click.option("--weight-decay", type=click.FloatRange(0), default=default("weight_decay"),
                         show_default=shown, callback=_finite, help="SGD weight decay." + note("weight_decay")),
            click.option("--seed", type=int, default=defaults.seed, show_default=True),
            click.option("--precision", type=click.Choice(PRECISIONS), default=defaults.precision, show_default=True,
                         help=PRECISION_HELP),
            click.option("--compile", "compile_mode", default=defaults.compile, show_default=True,
                         type=click.Choice(COMPILE_MODES),
                         help="torch.compile mode for the training step (reduce-overhead = CUDA graphs; "
                              "auto = reduce-overhead on CUDA, none on CPU)."),
            click.option("--compile-scope", default=defaults.compile_scope, show_default=True,
                         type=click.Choice(COMPILE_SCOPES),
                         help="What --compile wraps: the model, or the whole step (crop/flip, normalisation, "
                              "forward, loss) in one graph."),
            click.option("--max-steps-per-epoch", type=click.IntRange(1), default=None,
                         help="Cap steps per epoch (quick CPU-scale runs)."),
        ]):
            f = opt(f)
        return f
    return deco


def _train_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields the training options set (popped from ``kw``; None = not given)."""
    return {"epochs": kw.pop("epochs"), "lr": kw.pop("lr"), "lr_schedule": kw.pop("lr_schedule"),
            "batch_size": kw.pop("batch_size"),
            "weight_decay": kw.pop("weight_decay"), "seed": kw.pop("seed"), "precision": kw.pop("precision"),
            "compile": kw.pop("compile_mode"), "compile_scope": kw.pop("compile_scope"),
            "max_steps_per_epoch": kw.pop("max_steps_per_epoch"), "device": kw.pop("device")}


def _command_line() -> str:
    return "oodtune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class _Group(click.Group):
    """Reports user-facing errors (every OodtuneError, missing or existing files) as ``Error: message`` with exit
    status 1 instead of a traceback; ``OODTUNE_DEBUG=1`` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OodtuneError, FileExistsError, FileNotFoundError) as exc:
            if os.environ.get("OODTUNE_DEBUG", "0") != "0":
                raise
            raise click.ClickException(cli_message(str(exc))) from exc


def _log_to_console() -> None:
    """Library messages (the ``oodtune`` logger, INFO and up) on the CLI's console, once."""
    logger = logging.getLogger("oodtune")
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="oodtune")
def main() -> None:
    """Fine-tune image classifiers to flag out-of-distribution inputs, and measure it properly.

    \b
    Typical workflow:
      oodtune pretrain --dataset cifar10 --arch wrn-40-2 --val-fraction 0.1 --out runs/pre
      oodtune estimate-prior runs/pre/model.pt --outliers tin-aux --gamma 0.05 --out runs/prior.json
      oodtune finetune runs/pre/model.pt --method balanced-energy --prior runs/prior.json --out runs/bal
      oodtune evaluate runs/bal/model.pt --score energy --ood tin-near --ood dtd --out results/bal
      oodtune benchmark configs/cifar10-offline.toml
      oodtune calibrate runs/bal/model.pt --score energy --tpr 0.95 --out detector.json
      oodtune predict runs/bal/model.pt photos/ more.zip --detector detector.json --out preds.csv
    Your own model: `oodtune import-model WEIGHTS.pt --arch mypkg.nets:make_net --out mine.pt`,
    then use mine.pt wherever runs/pre/model.pt appears above. A segmenter (pixel-wise OOD):
    `oodtune import-model espnet_p_2_q_8_camvid.pth --arch espnet-camvid --dataset camvid --out seg.pt`,
    then --method pebal / balanced-pebal / energy-oe / balanced-energy and --ood road-anomaly.
    Scores are "higher = more in-distribution" everywhere.
    """
    _log_to_console()


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
@click.option("--resolution", type=click.IntRange(8), default=32, show_default=True,
              help="Input image size (images are resized on the shorter side and centre-cropped).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Hold this stratified, seeded fraction of the train split out before training (recorded; never "
                   "trained on, here or in any fine-tuning): held-out ID images for `oodtune calibrate`.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="For a folder: dataset without train/ and test/ folders: the part held out as its test set "
                   "[default: 0.2].")
@click.option("--eval-images", type=click.IntRange(0), default=EPOCH_EVAL_IMAGES, show_default=True,
              help="Report test (and validation) accuracy after every epoch on this many images of each (a fixed "
                   "seeded sample; 0 = not at all; the final model's accuracy is measured by `oodtune evaluate`).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, resume).")
@train_options(PRETRAIN, shown=True)
def pretrain(**kw: Any) -> None:
    """Train a classifier from scratch with cross-entropy (SGD+Nesterov, cosine, crop+flip).

    Test (and validation) accuracy is reported after every epoch (on --eval-images of each); OUT/history.csv logs
    each epoch. Interrupted runs resume from OUT/last.pt when started again with the same options.
    """
    from . import pipeline

    cfg = PRETRAIN.replace(**_train_overrides(kw))
    path = pipeline.pretrain(kw["out"], dataset=kw["dataset"], arch=kw["arch"], data_root=kw["data_root"], config=cfg,
               imbalance_ratio=kw["imbalance_ratio"], num_train=kw["num_train"], head=kw["head"],
               resolution=kw["resolution"], val_fraction=kw["val_fraction"], test_fraction=kw["test_fraction"],
               eval_images=kw["eval_images"])
    console.print(f"saved {path}")


@main.command("import-model")
@config_option
@common_options
@precision_option
@click.argument("weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--arch", required=True,
              help="Built-in architecture, or package.module:factory where factory(num_classes=K) returns your "
                   "nn.Module.")
@click.option("--dataset", default="cifar10", show_default=True,
              help="ID dataset the model was trained on (a [segmentation] set such as camvid imports a segmenter).")
@click.option("--head", default=None, help="Dotted name of the classification layer (default: the last nn.Linear).")
@click.option("--mean", type=(float, float, float), default=None,
              help="Per-channel mean the model's inputs were normalised with (pixels scaled to [0, 1]) [default: "
                   "the model's timm pretrained_cfg if it has one, else CIFAR-10's; segmentation: the published "
                   "ESPNet preprocessing, else ImageNet's].")
@click.option("--std", type=(float, float, float), default=None,
              help="Per-channel std the model's inputs were normalised with [default: as --mean].")
@click.option("--resolution", type=click.IntRange(8), default=32, show_default=True, help="Input image size.")
@click.option("--input-size", default=None, metavar="WxH",
              help="Segmentation: the frame size the model is fed at, e.g. 480x360 [default: the data set's].")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default=None,
              help="Segmentation: the model's input channel order [default: bgr for ESPNet, else rgb].")
@click.option("--extra-channels", type=click.IntRange(0), default=None,
              help="Segmentation: outputs after the K class logits (void / PEBAL's abstention channel, the last) "
                   "[default: read from ESPNet weights, else 0].")
@click.option("--trainable", multiple=True, metavar="MODULE",
              help="Segmentation: module fine-tuning trains, repeatable [default: ESPNet's last decoder block "
                   "(conv, classifier); else the whole model].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="oodtune checkpoint to write (.pt).")
@click.option("--check-accuracy/--no-check-accuracy", default=True, show_default=True,
              help="Report the ID test accuracy (segmentation: mIoU) after import (a wrong --mean/--std or --head "
                   "shows up here).")
def import_model(weights: str, arch: str, dataset: str, head: str | None, mean: tuple[float, float, float] | None,
                 std: tuple[float, float, float] | None, resolution: int, input_size: str | None,
                 channel_order: str | None, extra_channels: int | None, trainable: tuple[str, ...], out: str,
                 check_accuracy: bool, data_root: Any, device: str) -> None:
    """Wrap a classifier or segmenter trained elsewhere (its saved state_dict) as an oodtune checkpoint.

    Every other command then works on it: estimate-prior, propose-margins, finetune, evaluate, benchmark.
    """
    from . import pipeline
    from .data import is_segmentation_set
    from .models import read_meta

    if is_segmentation_set(dataset):
        path = pipeline.import_segmenter(weights, out, arch=arch, dataset=dataset, data_root=data_root,
                                input_size=parse_size(input_size) if input_size else None, mean=mean, std=std,
                                channel_order=channel_order, extra_channels=extra_channels,
                                trainable=trainable or None)
        console.print(f"saved {path}")
        if check_accuracy:
            m = pipeline.id_test_miou(path, data_root=data_root, device=device)
            console.print(f"{dataset} test mIoU of the imported model{_check_precision(device)}: {m['miou']:.2f}% "
                          f"with the argmax over all outputs, {m['miou_classes']:.2f}% over the classes only (pixel "
                          f"accuracy {m['pixel_accuracy']:.2f}% / {m['pixel_accuracy_classes']:.2f}%)")
        return
    path = pipeline.import_model(weights, out, arch=arch, dataset=dataset, data_root=data_root,
                                 resolution=resolution, mean=mean, std=std, head=head)
    meta = read_meta(path)
    console.print(f"saved {path} (input normalisation mean {meta.mean}, std {meta.std})")
    if check_accuracy:
        with trusted_archs(*([arch] if is_import_path(arch) else [])):  # the user named it with --arch
            acc = pipeline.id_test_accuracy(path, data_root=data_root, device=device)
        console.print(f"{dataset} test accuracy of the imported model{_check_precision(device)}: {100 * acc:.2f}%")


def _check_precision(device: str) -> str:
    """' (bf16; --precision fp32 for published float32 numbers)' when the import check ran in bf16, else ''."""
    if resolve_precision(resolve_device(device), current_inference_precision()) == "fp32":
        return ""
    return " (bf16; --precision fp32 gives the float32 numbers published models report)"


@main.command("estimate-prior")
@config_option
@pretrained_and_outliers
@precision_option
@click.option("--gamma", type=click.FloatRange(0), default=DEFAULT_GAMMA, show_default=True,
              help="Power applied to the prior before L1 normalisation (Balanced Energy's γ; the paper's CIFAR-10 "
                   "value; its long-tailed runs use 0.5, the segmentation code 3).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the prior (JSON).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also save a bar chart (PNG).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def estimate_prior(checkpoint: str, outliers: str | None, gamma: float, out: str, plot: str | None, overwrite: bool,
                   data_root: Any, device: str) -> None:
    """Balanced Energy step 1: the outlier class prior P(y|o) as predicted by the pretrained model (segmentation:
    over the pixels of objects pasted into the ID train frames)."""
    from . import pipeline

    outliers = outliers or pipeline.default_outliers(checkpoint)
    check_output_file(out, overwrite)  # before spending the forward passes
    if plot:
        check_output_file(plot, overwrite=True)
    prior = pipeline.estimate_prior(checkpoint, outliers=outliers, data_root=data_root, gamma=gamma, device=device)
    pipeline.save_prior(prior, out, checkpoint=checkpoint, plot=plot, overwrite=overwrite)
    for name, n, p, pg in zip(prior.class_names, prior.counts, prior.probabilities().tolist(),
                              prior.gamma_prior().tolist(), strict=True):
        click.echo(f"{name:12s} {n:7d}  P={p:.4f}  P_gamma={pg:.4f}")
    console.print(f"saved {out}")


@main.command("propose-margins")
@pretrained_and_outliers
@precision_option
@id_data_option
def propose_margins(checkpoint: str, outliers: str | None, data_root: Any, device: str, id_data: str | None) -> None:
    """Suggest m_in / m_out from the pretrained model's energies on ID train data and outliers (segmentation: on
    pixels of the train frames and of objects pasted into them)."""
    from . import pipeline

    outliers = outliers or pipeline.default_outliers(checkpoint)
    p = pipeline.propose_margins(checkpoint, outliers=outliers, data_root=data_root, device=device, id_data=id_data)
    click.echo(f"ID energy median {p.median_in:.2f}, outlier energy median {p.median_out:.2f}")
    click.echo(f"proposed --m-in {p.m_in:.1f} --m-out {p.m_out:.1f} (hinges start active on "
               f"{100 * p.coverage_in:.0f}% of ID and {100 * p.coverage_out:.0f}% of outliers)")


def loss_option_flags(f: Any) -> Any:
    """One option per loss option of any task (``oodtune.losses.LOSS_OPTIONS``), its help with each task's default;
    every one defaults to "not given" (the checkpoint's task default applies)."""
    for o in reversed(LOSS_OPTIONS.values()):
        kind: dict[str, Any]
        if o.auto:
            kind = {"callback": _finite_or_auto, "metavar": "FLOAT|auto"}
        elif o.kind is bool:
            kind = {"flag_value": True, "type": bool}
        elif o.choices:
            kind = {"type": click.Choice(o.choices)}
        else:
            kind = {"type": o.kind, "callback": _finite}
        f = click.option(o.flag, o.name, default=None, help=option_help(o.name), **kind)(f)
    return f


@main.command()
@config_option
@common_options
@trust_option
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--method", required=True, help=METHODS_HELP)
@click.option("--outliers", default=None, help=OUTLIERS_HELP + " Its train split is used.")
@click.option("--prior", "prior_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Outlier prior JSON from `oodtune estimate-prior` (balanced-energy).")
@click.option("--gamma", type=click.FloatRange(0), default=None, help="Override the prior's γ.")
@loss_option_flags
@click.option("--outlier-batch-size", "--pasted-frames", "outlier_batch_size", type=click.IntRange(1), default=None,
              help=f"Classification: auxiliary outliers per step [default: {FINETUNE.outlier_batch_size}]. "
                   "Segmentation (--pasted-frames): frames of each batch that get a pasted object [default: "
                   f"{SEGMENTATION_FINETUNE.outlier_batch_size}].")
@click.option("--train-part", default=None,
              help="Segmentation: which part trains: head (the checkpoint's trainable block), decoder, all, or "
                   "comma-separated module names; frozen parts keep their BatchNorm statistics [default: head].")
@click.option("--paste-mode", type=click.Choice(PASTE_MODES), default=None,
              help="Segmentation: object (one object per pasted frame, scaled U(0.1, 0.5)) or reference (PEBAL's: "
                   "a photo's objects at native scale, frame flip 0.8 / scale 0.5-2 / crop) [default: object].")
@click.option("--paste-share", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Segmentation, --paste-mode reference: probability that a frame carries pasted objects "
                   "[default: 1/11, PEBAL's].")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@id_data_option
@train_options(FINETUNE, shown=False)
def finetune(**kw: Any) -> None:
    """Fine-tune a pretrained checkpoint with an OOD-aware loss (on the ID *train* split only)."""
    from . import pipeline
    from .losses.prior import OutlierPrior

    prior = OutlierPrior.load(kw["prior_path"]) if kw["prior_path"] else None
    if prior is not None and kw["gamma"] is not None:
        prior = OutlierPrior(counts=prior.counts, gamma=kw["gamma"], class_names=prior.class_names)
    given = {k: kw.pop(k) for k in LOSS_OPTIONS}
    loss_options = {k: v for k, v in given.items() if v is not None}
    cfg = pipeline.finetune_config(kw["checkpoint"], **_train_overrides(kw),
                                   outlier_batch_size=kw["outlier_batch_size"], train_part=kw["train_part"],
                                   paste_mode=kw["paste_mode"], paste_share=kw["paste_share"])
    outliers = kw["outliers"] or pipeline.default_outliers(kw["checkpoint"])
    path = pipeline.finetune(kw["checkpoint"], kw["out"], method=kw["method"], data_root=kw["data_root"],
                             outliers=outliers, prior=prior, config=cfg, loss_options=loss_options,
                             id_data=kw["id_data"])
    console.print(f"saved {path}")


@main.command()
@config_option
@common_options
@precision_option
@trust_option
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--score", "scores", multiple=True, type=click.Choice(SCORE_NAMES), default=("msp", "energy"),
              show_default=True, help="Repeat for several scores.")
@click.option("--ood", multiple=True, required=True, help="OOD test set; repeat for several (see `oodtune datasets`).")
@click.option("--num-ood", type=click.IntRange(1), default=None, help="Seeded subsample of each OOD set.")
@click.option("--positive", type=click.Choice(["in", "out"]), default=None,
              help="Which class the metrics treat as positive (default: see oodtune.metrics).")
@click.option("--select-on", default=None, metavar="OUTLIERS",
              help="Choose each score's hyperparameters on never-trained-on ID images (the part held out before "
                   "pretraining, --val-fraction) vs these held-out auxiliary outliers (e.g. tin-aux-val; never an "
                   "OOD test set); the papers' value is kept unless the validation gain exceeds its standard error.")
@click.option("--id-holdout", type=click.IntRange(1), default=1000, show_default=True,
              help="How many never-trained-on ID images --select-on scores.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write OUT.json, OUT.md and OUT.csv with the table (a .json, .md or .csv suffix on OUT is "
                   "dropped).")
@click.option("--save-scores", is_flag=True,
              help="Also write OUT-scores.csv: every image's score (dataset, index, one column per score).")
@click.option("--blur", is_flag=True,
              help="Segmentation: Gaussian-blur the per-pixel score maps (kernel 7, sigma 1) before the metrics.")
@click.option("--exact", is_flag=True,
              help="Segmentation: count pixels by their full float32 score, so AUROC, AP and FPR95 are exact "
                   "(the table's bound columns become 0); memory grows with the number of distinct scores "
                   "(16 bytes each) instead of the default fixed-size counts.")
@click.option("--overwrite", is_flag=True, help="Replace existing OUT files.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="PREFIX",
              help="Also draw PREFIX-SCORE-hist.png (score histograms, ID vs each OOD set) and PREFIX-SCORE-roc.png "
                   "(ROC per OOD set), the table's AUROC in the legends; segmentation also PREFIX-SCORE-maps-SET.png "
                   "(score maps of 4 frames of each anomaly set).")
@click.option("--roc-log-fpr", is_flag=True, help="With --plot: FPR on a log axis.")
@click.option("--id-metrics/--no-id-metrics", default=True, show_default=True,
              help="Segmentation: compute the ID test mIoU first (a pass over every ID test frame); "
                   "--no-id-metrics when only the anomaly metrics are wanted.")
@id_data_option
def evaluate(checkpoint: str, scores: tuple[str, ...], ood: tuple[str, ...], num_ood: int | None,
             positive: str | None, select_on: str | None, id_holdout: int, blur: bool, exact: bool, out: str | None,
             save_scores: bool, overwrite: bool, plot: str | None, roc_log_fpr: bool, id_metrics: bool,
             data_root: Any, device: str, id_data: str | None) -> None:
    """Accuracy + AUROC / AUPR-In / AUPR-Out / FPR95 for each score on each OOD set."""
    from . import pipeline
    from .models import read_meta
    from .plots import plot_anomaly_maps, short_name
    from .report import (
        evaluation_paths,
        evaluation_plot_paths,
        evaluation_table,
        id_metrics_text,
        scores_path,
        write_evaluation,
        write_evaluation_plots,
    )

    if save_scores and not out:
        raise click.UsageError("--save-scores writes OUT-scores.csv: give --out OUT too.")
    segmentation = read_meta(checkpoint).task == "segmentation"
    maps = evaluation_plot_paths(plot, scores, ood)[2 * len(scores):] if plot and segmentation else []
    planned = [*(evaluation_paths(out) if out else []), *([scores_path(out)] if out and save_scores else []),
               *(evaluation_plot_paths(plot, scores) if plot else []), *maps]
    existing = [str(p) for p in planned if p.exists() and not overwrite]
    if existing:  # refuse before spending the evaluation
        raise click.ClickException(f"{', '.join(existing)} exists; pass --overwrite or choose another --out/--plot.")
    for target in [*(evaluation_paths(out)[:1] if out else []), *([Path(plot)] if plot else [])]:
        check_writable(target.parent, "choose another --out/--plot")
    validation = pipeline.ValidationSpec(outliers=select_on, id_holdout=id_holdout) if select_on else None
    report, meta = pipeline.evaluate_checkpoint(checkpoint, scores=scores, ood=ood, data_root=data_root, device=device,
                                       num_ood=num_ood, positive=positive, blur=blur,  # type: ignore[arg-type]
                                       id_data=id_data, validation=validation, id_metrics=id_metrics, exact=exact)
    for name, sel in report.selections.items():
        if sel["tried"]:
            click.echo(f"{name}: chose {sel['chosen']} (paper default {sel['default']}) on the validation pair")
    click.echo(id_metrics_text(report, meta))
    click.echo(evaluation_table(report))
    if out:
        written = write_evaluation(out, report, meta, checkpoint=checkpoint, command=_command_line(),
                                   overwrite=overwrite, save_scores=save_scores)
        console.print("wrote " + ", ".join(map(str, written)))
    if plot:
        paths = write_evaluation_plots(plot, report, title=short_name(str(checkpoint)), log_fpr=roc_log_fpr)
        targets = iter(maps)
        for score in scores if segmentation else ():
            for dataset in ood:
                frames, labels, smaps = pipeline.anomaly_examples(checkpoint, dataset, 4, data_root=data_root,
                                                                  device=device, score=score)
                paths.append(plot_anomaly_maps(next(targets), frames, labels, {short_name(str(checkpoint)): smaps},
                                               score=score, title=f"{dataset}: {score} score maps" +
                                               (" (before --blur)" if blur else "")))
        console.print("wrote " + ", ".join(str(p) for p in paths))


@main.command()
@config_option
@common_options
@precision_option
@id_data_option
@trust_option
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--score", type=click.Choice(SCORE_NAMES), default="energy", show_default=True,
              help="The OOD score (mahalanobis/knn are fitted on the checkpoint's ID training split).")
@click.option("--tpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95, show_default=True,
              help="Fraction of held-out ID images the threshold accepts (ID true-positive rate).")
@click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Guarantee: choose the threshold so that new ID images are accepted at rate >= TPR with this "
                   "probability over the draw of the calibration set (order-statistic bound; e.g. 0.99). Without "
                   "it, TPR is met on average (point estimate). Both thresholds are recorded.")
@click.option("--calibration-data", default="auto", show_default=True, metavar="auto|val|train|folder:PATH",
              help="ID images that set the threshold: auto = the validation part held out before training "
                   "(pretrain --val-fraction), else the dataset's val split; train = training images (biased, "
                   "warned); folder:PATH / images:PATH = your held-out ID images. Never the test split.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Measure the acceptance rate reached on the ID test split (test images that are also "
                   "calibration images, found by content, are left out).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Detector file to write (JSON).")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the detector as one program: uint8 images in, logits, score and is_ood out (a "
                   "segmenter: class_map, anomaly and mask). A .onnx "
                   "name writes an ONNX graph (opset 18; serve with onnxruntime; needs the onnx extra), any other a "
                   "torch.export program (.pt2; loads with PyTorch alone).")
@click.option("--overwrite", is_flag=True, help="Replace existing --out / --export files.")
@click.option("--blur", is_flag=True,
              help="Segmentation: threshold Gaussian-blurred score maps (as evaluate --blur); recorded in the "
                   "detector, which predict then applies.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="PNG",
              help="Also draw the histogram of the calibration scores (and the check's) with the threshold.")
def calibrate(checkpoint: str, score: str, tpr: float, confidence: float | None, calibration_data: str, check: bool,
              out: str, export_path: str | None, overwrite: bool, blur: bool, plot: str | None, data_root: Any,
              device: str, id_data: str | None) -> None:
    """Choose the OOD threshold on held-out ID images so that the fraction TPR of them is accepted.

    Records score, threshold, TPR reached, n, the images used and the weights' hash (a detector is never applied
    to another checkpoint). Use it with `oodtune predict CHECKPOINT IMAGES --detector OUT`. For a segmentation
    checkpoint the threshold is per pixel: TPR of the non-void pixels of the held-out ID frames are accepted.
    """
    from . import pipeline
    from .deploy import Detector
    from .deploy.pixel_detector import PixelCalibration

    targets = [p for p in (out, export_path, plot) if p]
    existing = [p for p in targets if Path(p).exists() and not overwrite]
    if existing:  # refuse before spending the forward passes
        raise click.ClickException(f"{', '.join(existing)} exists; pass --overwrite or choose another path.")
    if export_path:
        _check_export(score, export_path)
    for target in targets:
        check_writable(Path(target).parent, "choose another path")
    det = pipeline.calibrate(checkpoint, score=score, tpr=tpr, data=calibration_data, data_root=data_root,
                             device=device, id_data=id_data, check=check, blur=blur, confidence=confidence)
    cal = det.calibrated()
    pixels = isinstance(cal, PixelCalibration)
    unit = f"pixels of {cal.frames} frames" if isinstance(cal, PixelCalibration) else "images"
    rule = "a pixel is anomalous when score < threshold" if pixels else "is_ood = score < threshold"
    click.echo(f"score {score}: threshold {cal.threshold:.6g} ({rule}) accepts "
               f"{100 * cal.achieved:.2f}% of {cal.n} calibration {unit} [{cal.data}]")
    if isinstance(det, Detector):
        click.echo(det.guaranteed().summary())
    spread = "frame-clustered standard error" if pixels else "std"
    click.echo(f"expected acceptance of new ID {'pixels' if pixels else 'images'}: {100 * cal.expected:.2f}% "
               f"± {100 * cal.expected_std:.2f}% ({spread})")
    if cal.check is not None:
        c = cal.check
        verdict = "within" if abs(c["z"]) <= 2 else "OUTSIDE"
        what = f"{c['n']} pixels of {c['frames']} ID test frames" if pixels else f"{c['n']} ID test images"
        click.echo(f"check on {what}: {100 * c['acceptance']:.2f}% ± {100 * c['std']:.2f}% accepted "
                   f"(z = {c['z']:+.2f}: {verdict} 2 standard errors of the expectation)")
    det.save(out, overwrite=overwrite)
    console.print(f"saved {out}")
    if plot and det.calibration_scores is not None:
        from .plots import plot_calibration, short_name

        cal_scores, check_scores = det.calibration_scores
        drawn = plot_calibration(plot, cal_scores, cal.threshold, score=score, tpr=tpr, check_scores=check_scores,
                                 unit="pixels (sample)" if pixels else "images",
                                 title=f"calibration of {short_name(checkpoint)}")
        console.print(f"saved {drawn}")
    if export_path:
        console.print(f"saved {_export(det, export_path, overwrite)}")


EXPORT_SUFFIXES = {".onnx": "onnx", ".pt2": "pt2"}


def _export_format(path: str, fmt: str | None = None) -> str:
    """The export format: ``fmt``, else the one --out's suffix names (pt2 for any other suffix). A ``fmt`` that
    contradicts a .onnx / .pt2 suffix is refused: serving tools go by the suffix and would misread the file."""
    named = EXPORT_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is not None and named is not None and fmt != named:
        raise click.ClickException(f"--format {fmt} writes a {fmt} file, but --out {path} has the {named} suffix; "
                                   f"name it with .{fmt}, or drop --format.")
    return fmt or named or "pt2"


def _check_export(score: str, path: str, fmt: str | None = None) -> None:
    """Refuse, before any work, an export of a score that has none (an ONNX one also without the onnx extra)."""
    from .deploy import check_exportable

    if _export_format(path, fmt) == "onnx":
        from .deploy import onnx_refusal, require_onnx
        from .scores import build_score

        reason = onnx_refusal(build_score(score))
        if reason:
            raise click.ClickException(f"{reason}; export another score, or serve the Python Detector.")
        require_onnx()
    else:
        check_exportable(score)


def _export(det: Any, path: str, overwrite: bool, fmt: str | None = None) -> Path:
    """Write ``det`` as ONNX (a .onnx name or ``fmt``) or as a torch.export program."""
    from .deploy import SegmentationDetector

    if _export_format(path, fmt) == "onnx":
        from .deploy import export_onnx

        return export_onnx(det, path, overwrite=overwrite)
    if isinstance(det, SegmentationDetector):
        return det.export(path, overwrite=overwrite)
    from .deploy import export_detector

    return export_detector(det, path, overwrite=overwrite)


@main.command("export")
@trust_option
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--detector", required=True, type=click.Path(dir_okay=False),
              help="Detector file from `oodtune calibrate` for this checkpoint.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write (.onnx or .pt2).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2"]), default=None,
              help="onnx (an ONNX graph, opset 18) or pt2 (a torch.export program) [default: from --out's suffix].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def export_command(checkpoint: str, detector: str, out: str, fmt: str | None, overwrite: bool) -> None:
    """Write a calibrated detector as one program (normalisation, network, score, decision): uint8 images in,
    logits, score and is_ood out (a segmenter: frames in, class map, anomaly map and mask out). ONNX serves with
    onnxruntime alone (README: Serving)."""
    from .deploy import Detector, SegmentationDetector
    from .models import read_meta

    if Path(out).exists() and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite or choose another --out.")
    kind = SegmentationDetector if read_meta(checkpoint).task == "segmentation" else Detector
    det = kind.load(detector, checkpoint, device="cpu")
    _check_export(det.score_name, out, fmt)
    console.print(f"saved {_export(det, out, overwrite, fmt)}")


@main.command()
@trust_option
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--detector", required=True, type=click.Path(dir_okay=False),
              help="Detector file from `oodtune calibrate` for this checkpoint.")
@click.option("--out", type=click.Path(), default=None,
              help="Predictions file: CSV, or JSON Lines for a .jsonl name [default: CSV on stdout]. Segmentation: "
                   "the folder for the maps and OUT/predictions.jsonl (required).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="Override the format chosen from --out's suffix.")
@click.option("--fdr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Flag the whole batch with Benjamini-Hochberg on the p-values instead of the threshold: the "
                   "expected share of ID images among those flagged is <= FDR (e.g. 0.1). Rows are written after "
                   "the last image. Image classifiers only.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Images per forward pass [default: 256; segmentation: 8 frames].")
@threads_option
@precision_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (segmentation: files in --out).")
@click.option("--strict", is_flag=True,
              help=f"Exit with status {EXIT_SOME_FAILED} when any input could not be predicted (for pipelines).")
@click.option("--blur/--no-blur", default=None,
              help="Segmentation: Gaussian-blurred score maps, as evaluate --blur [default: as the detector was "
                   "calibrated; anything else is refused].")
@click.option("--map-format", type=click.Choice(["png", "npy"]), default="png", show_default=True,
              help="Segmentation: anomaly maps as 16-bit PNG (scaling in the detector file) or float32 .npy.")
def predict(checkpoint: str, images: tuple[str, ...], detector: str, out: str | None, fmt: str | None,
            fdr: float | None, batch_size: int | None, device: str, overwrite: bool, strict: bool,
            blur: bool | None, map_format: str) -> None:
    """One row per image: path, predicted_class, confidence, score, margin (score - threshold), p_value, is_ood,
    error.

    IMAGES are image files, folders (searched recursively), glob patterns (quote them: 'shots/**/*.png') and
    tar/zip archives. A file that cannot be read (corrupt, a FIFO, a name that is not UTF-8, ...) is a row with
    its error; the others are still predicted. p_value is the conformal p-value of the score against the
    detector's calibration scores (small = unusual for ID images); is_ood is score < threshold, or with --fdr the
    Benjamini-Hochberg decision over the batch.

    CSV cells that a spreadsheet would run as a formula (text starting with = + - @, a tab or a carriage return)
    are written with a leading ' (so "=x.png" appears as "'=x.png"); JSON Lines (--format jsonl) hold the exact
    values.

    A segmentation checkpoint writes, per frame, into the folder --out: the anomaly map, the binary mask, an
    overlay JPEG, and one row of OUT/predictions.jsonl (anomalous-pixel share, connected components, predicted
    class histogram); see docs/deploy.md.

    \b
    Exit status:
      0  every input predicted (or some rows failed, without --strict)
      1  error before predicting (bad detector file, existing --out, ...)
      2  usage error (unknown option, bad value)
      3  some rows failed, with --strict
      4  no input could be predicted (the error rows are still written)
    """
    from . import pipeline
    from .data.inputs import skipped_text
    from .models import read_meta
    from .report import write_predictions

    skipped: Counter[str] = Counter()
    if read_meta(checkpoint).task == "segmentation":
        if fdr is not None:
            raise click.UsageError("--fdr flags whole images from their p-values; a segmenter's maps have none: "
                                   "drop --fdr.")
        total, failed = _predict_frames(checkpoint, images, detector, out, fmt, batch_size or 8, device, overwrite,
                                        blur, map_format, skipped)
    else:
        if blur is not None:
            raise click.UsageError("--blur/--no-blur apply to segmentation checkpoints only.")
        if out and Path(out).is_dir():
            raise click.ClickException(f"{out} is a folder; --out names the predictions file.")
        if out and Path(out).exists() and not overwrite:
            raise click.ClickException(f"{out} exists; pass --overwrite or choose another --out.")
        rows = pipeline.predict(checkpoint, images, detector=detector, device=device, batch_size=batch_size or 256,
                                skipped=skipped, fdr=fdr)
        counts = write_predictions(out, rows, fmt=fmt, overwrite=overwrite)
        total, failed = sum(counts.values()), counts["error"]
        rule = f" (Benjamini-Hochberg at FDR {fdr:g})" if fdr is not None else ""
        console.print(f"{total} input(s): {counts['ood']} flagged OOD{rule}, {counts['id']} accepted as ID, "
                      f"{failed} unreadable" + (f"; wrote {out}" if out else ""))
    if skipped:
        console.print(skipped_text(skipped))
    if failed == total:
        click.echo(f"Error: no input could be predicted ({total} error row(s)).", err=True)
        sys.exit(EXIT_NONE_PREDICTED)
    if strict and failed:
        click.echo(f"Error: {failed} of {total} input(s) could not be predicted (--strict).", err=True)
        sys.exit(EXIT_SOME_FAILED)


def _predict_frames(checkpoint: str, images: tuple[str, ...], detector: str, out: str | None, fmt: str | None,
                    batch_size: int, device: str, overwrite: bool, blur: bool | None, map_format: str,
                    skipped: Any) -> tuple[int, int]:
    """``predict`` for a segmentation checkpoint: maps into the folder ``out``, rows to OUT/predictions.jsonl;
    returns (frames, unreadable frames)."""
    from . import pipeline
    from .report import write_predictions

    if out is None:
        raise click.UsageError("a segmentation checkpoint writes maps per frame: give --out FOLDER.")
    if fmt == "csv":
        raise click.UsageError("segmentation rows have nested fields (component sizes, class histogram): they are "
                               "written as JSON Lines; drop --format csv.")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise click.ClickException(f"{out} is a file; a segmentation checkpoint writes a folder of maps: choose "
                                   "another --out.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise click.ClickException(f"{out} is not empty; pass --overwrite (files of the same name are replaced) or "
                                   "choose another --out.")
    rows_path = folder / "predictions.jsonl"
    tally: Counter[str] = Counter()

    def counted(rows: Any) -> Any:
        for row in rows:
            tally["error" if row["error"] else "anomalous" if row["components"] else "clean"] += 1
            yield row

    rows = pipeline.predict_frames(checkpoint, images, detector=detector, out=folder, device=device,
                                   batch_size=batch_size, blur=blur, map_format=map_format, skipped=skipped)
    write_predictions(rows_path, counted(rows), fmt="jsonl", overwrite=True)
    console.print(f"{sum(tally.values())} frame(s): {tally['anomalous']} with anomalous pixels, {tally['clean']} "
                  f"without, {tally['error']} unreadable; wrote {rows_path} and the maps beside it")
    return sum(tally.values()), tally["error"]


def _size(n: float) -> str:
    """``n`` bytes as B, KiB, MiB or GiB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


@main.command()
@click.option("--clear", "clear", multiple=True, metavar="KIND",
              help="Remove the entries of this kind (images, segmentation, extracted, trunk, ... as listed) or all; "
                   "repeatable. Everything removed is rebuilt when next needed.")
@click.option("--older-than", type=click.FloatRange(0), default=None, metavar="DAYS",
              help="With --clear: only entries not modified for more than DAYS days.")
@click.option("--verbose", "-v", is_flag=True, help="List every entry, not only the total per kind.")
def cache(clear: tuple[str, ...], older_than: float | None, verbose: bool) -> None:
    """Show what the on-disk cache holds ($OODTUNE_CACHE, else ~/.cache/oodtune), or remove part of it: decoded
    data sets, unpacked archives and frozen segmentation trunk features, all rebuilt on demand."""
    from .data.cache import default_cache_dir
    from .data.cache_admin import cache_entries, remove_entries

    root = default_cache_dir()
    if older_than is not None and not clear:
        raise click.UsageError("--older-than selects what --clear removes: give --clear KIND (or all) too.")
    if clear:
        removed = remove_entries(list(clear), root=root, older_than_days=older_than)
        click.echo(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
                   f"{_size(sum(e.size for e in removed))}, from {root}")
        return
    entries = cache_entries(root)
    if not entries:
        click.echo(f"{root}: empty")
        return
    click.echo(f"{root}: {_size(sum(e.size for e in entries))} in {len(entries)} entries")
    for kind in dict.fromkeys(e.kind for e in entries):
        mine = [e for e in entries if e.kind == kind]
        oldest = max(e.age_days() for e in mine)
        click.echo(f"  {kind:14s} {len(mine):4d} entries {_size(sum(e.size for e in mine)):>10s}  "
                   f"(oldest written {oldest:.0f} days ago)")
        if verbose:
            for e in mine:
                click.echo(f"    {e.name:52s} {_size(e.size):>10s}  written {e.age_days():.0f} days ago")


@main.command()
def examples() -> None:
    """List the example benchmark configs that ship with oodtune (`oodtune benchmark NAME` runs one)."""
    from .benchmark import example_configs

    for name, path in example_configs().items():
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        click.echo(f"{click.style(f'{name:22s}', bold=True)} {first}\n{'':22s} {path}")


@main.command()
@trust_option
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--data-root", envvar="OODTUNE_DATA", type=click.Path(file_okay=False), default=None,
              help="Overrides the config's data_root.")
@threads_option
@click.option("--device", default=None, callback=_device, help="Overrides the config's device.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Overrides the config's out folder.")
@click.option("--only", multiple=True, metavar="METHOD",
              help="Run only this row of the config (label or slug, e.g. 'energyoe'); repeatable. The other "
                   "rows are tabulated from their finished runs.")
@click.option("--seed", "seed", multiple=True, type=int, metavar="SEED",
              help="Fine-tune only this seed of [benchmark].seeds (of the --only rows, else of every row); "
                   "repeatable. Processes with different seeds share one grid; post-hoc rows run with the first "
                   "seed.")
@click.option("--report-only", is_flag=True,
              help="Train nothing: tabulate the runs already finished (and the comparisons' CIs) and list the "
                   "missing ones.")
@click.option("--n-boot", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Bootstrap replicates of each [[comparisons]] CI.")
@click.option("--bootstrap-seed", type=int, default=0, show_default=True, help="Seed of the bootstrap draws.")
@click.option("--pretrain-seed", "pretrain_seed", multiple=True, type=int, metavar="SEED",
              help="Nested seeds: run only the pretrained model of this [benchmark].pretrain_seeds entry (and its "
                   "rows); repeatable. Several processes with different seeds can share one benchmark.")
@click.option("--merge", "merge", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="First take the finished runs and stored evaluations of DIR, another output folder of this "
                   "benchmark (trained on another machine or at another time), into OUT; nothing in OUT is "
                   "replaced, and a run both hold with different weights is refused. Repeatable.")
def benchmark(config: str, data_root: str | None, device: str | None, out: str | None, only: tuple[str, ...],
              seed: tuple[int, ...], report_only: bool, n_boot: int, bootstrap_seed: int,
              pretrain_seed: tuple[int, ...], merge: tuple[str, ...]) -> None:
    """Run a grid (methods x seeds x OOD sets) from one pretrained checkpoint — or from one per
    [benchmark].pretrain_seeds (nested seeds) —; resumes if interrupted.

    CONFIG is a TOML file, or the name of an example (`oodtune examples`). Writes OUT/results.json, results.md,
    results.csv and plots (energy histograms, ROC curves); with [[comparisons]], OUT/comparisons.md / .json (paired
    differences with hierarchical bootstrap CIs and verdicts) and OUT/forest.png. With --merge, runs trained into
    other output folders join OUT first, so that one report covers them all.
    """
    from .benchmark import find_config, load_benchmark_config, merge_outputs, run_nested

    cfg = load_benchmark_config(find_config(config), data_root=data_root, device=device, out=out, only=list(only),
                                only_seeds=list(seed))
    for folder in merge:
        console.print(merge_outputs(cfg, folder).describe())
    paths = run_nested(cfg, command=_command_line(), report_only=report_only, n_boot=n_boot,
                       bootstrap_seed=bootstrap_seed, models=pretrain_seed)
    console.print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
