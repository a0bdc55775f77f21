"""The benchmark TOML file: one schema, checked completely before any work starts.

Sections (``configs/*.toml`` are documented examples):

* ``[benchmark]`` — ``name``, ``protocol`` (fills ``id_dataset``/``outliers``/``ood_near``/``ood_far`` from
  :data:`oodtune.data.PROTOCOLS`; keys given here override it), ``id_dataset``, ``arch``, ``outliers``,
  ``ood_near``, ``ood_far``, ``num_ood``, ``seeds``, ``out``, ``data_root``, ``device``, ``pretrained`` (an
  existing checkpoint instead of pretraining one), ``id_split`` (the ID split the ID-task metrics are measured
  on, default ``test``; ``val`` for a validation grid), ``pretrain_seeds`` (nested seeds: one independently
  pretrained model per seed, each with every row x ``seeds``, under ``OUT/pretrain-s<seed>``; :mod:`.nested`),
  ``blur`` (segmentation: the score maps as measured, ``"off"`` (default), Gaussian-blurred (kernel 7, σ 1) as
  PEBAL's test code does, ``"on"``, or ``"both"``: every row twice, the blurred one labelled ``LABEL +blur``).

A segmentation ``id_dataset`` (e.g. ``camvid``) makes it a segmentation benchmark: ``pretrained`` is then required
(segmenters are imported, not pretrained: ``oodtune import-model``), the methods are the pixel methods of
:mod:`oodtune.losses.pixel`, the post-hoc rows the pixel scores, and fine-tuning starts from the segmentation
recipe.
* ``[pretrain]`` — training options (:class:`~oodtune.training.config.TrainConfig` fields) plus ``num_train``,
  ``imbalance_ratio`` and ``val_fraction`` (a validation part held out before pretraining, for calibration).
* ``[finetune]`` — training options applied to every fine-tuning row.
* ``[[methods]]`` — one row each: ``label`` and ``method`` (a post-hoc score name, or a fine-tuning method such
  as ``balanced-energy+sparsity``), optionally ``score`` (the score a fine-tuned row is measured with, default
  ``energy``), ``gamma`` (the prior's γ), ``scratch`` (train from random initialisation with the ``[pretrain]``
  schedule), loss options (``m_in``, ``m_out`` — a number or ``"auto"`` —, ``alpha``, ``energy_weight``, ...)
  and training options overriding ``[finetune]`` for this row.
* ``[matrix]`` (optional) — the score × model matrix (:mod:`.matrix`): ``scores`` (score names), ``hyperparameters``
  (a list of ``"selected"`` — chosen on the validation pair — and/or ``"default"`` — the papers' values; default
  both), ``validation_outliers`` (held-out auxiliary outliers; default the protocol's ``aux_val``),
  ``num_validation_outliers``, ``id_holdout`` (never-trained-on ID images the selection scores; default 1000).
* ``[selection]`` (optional; a validation grid) — ``default`` (the label of the fine-tuned row holding the paper's
  setting), ``metric`` (``auroc`` or ``aupr_out``; default ``auroc``), ``dataset`` (the held-out OOD set it is
  measured on; default the benchmark's only one), ``id_tolerance`` (rows whose ID metric — mIoU, accuracy — falls
  more than this many points below the pretrained model's are not eligible): :mod:`.selection` names the row to
  keep, the default unless a row beats it by more than the standard error of the gain.
* ``[[comparisons]]`` (optional) — one claim each, "row ``better`` beats row ``than``" (labels of ``[[methods]]``),
  optionally ``label``: the paired difference with a hierarchical bootstrap CI and its verdict
  (:mod:`.compare`, :mod:`oodtune.metrics.bootstrap`).

An unknown key, a value of the wrong type, an unknown method/score/dataset/protocol or a loss option the method
does not use is an error naming the file, the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import PROTOCOLS, available_datasets
from ..data.registry import canonical_name, is_segmentation_set
from ..errors import ConfigError
from ..losses.options import LOSS_OPTIONS
from ..losses.pixel import build_pixel_loss
from ..losses.registry import TASK_LOSSES
from ..losses.terms import build_method_loss
from ..pipeline.task import TASK_REGISTRY
from ..scores import PIXEL_SCORE_NAMES, SCORE_NAMES
from ..training.config import PRETRAIN, TRAIN_KEYS, TrainConfig

__all__ = ["BenchmarkConfig", "Comparison", "MatrixSpec", "MethodSpec", "SelectionSpec", "load_benchmark_config",
           "POSTHOC"]

POSTHOC = frozenset(SCORE_NAMES)
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
#: TrainConfig field -> accepted Python types (from its annotations).
TRAIN_TYPES: dict[str, tuple[type, ...]] = {
    f.name: tuple(_TYPES[t.strip()] for t in str(f.type).split("|")) for f in dataclasses.fields(TrainConfig)
}
BENCHMARK_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "protocol": (str,), "id_dataset": (str,), "arch": (str,), "outliers": (str,), "ood_near": (list,),
    "ood_far": (list,), "num_ood": (int,), "seeds": (list,), "out": (str,), "data_root": (str,), "device": (str,),
    "pretrained": (str,), "id_split": (str,), "pretrain_seeds": (list,), "blur": (str,),
}
#: ``[benchmark].blur``: which score maps a segmentation benchmark reports (False = as measured, True = blurred).
BLUR_VARIANTS: dict[str, tuple[bool, ...]] = {"off": (False,), "on": (True,), "both": (False, True)}
PRETRAIN_EXTRA: dict[str, tuple[type, ...]] = {"num_train": (int,), "imbalance_ratio": (float,),
                                               "val_fraction": (float,)}
#: loss option -> accepted TOML types (from the one table of loss options).
LOSS_TYPES: dict[str, tuple[type, ...]] = {name: o.toml_types for name, o in LOSS_OPTIONS.items()}
METHOD_KEYS: dict[str, tuple[type, ...]] = {
    "label": (str,), "method": (str,), "score": (str,), "gamma": (float,), "scratch": (bool,), **LOSS_TYPES,
    **{k: v for k, v in TRAIN_TYPES.items() if k not in ("seed", "device")},
}
MATRIX_KEYS: dict[str, tuple[type, ...]] = {
    "scores": (list,), "hyperparameters": (list,), "validation_outliers": (str,), "num_validation_outliers": (int,),
    "id_holdout": (int,),
}
HYPERPARAMETER_MODES = ("selected", "default")
COMPARISON_KEYS: dict[str, tuple[type, ...]] = {"better": (str,), "than": (str,), "label": (str,)}
SELECTION_KEYS: dict[str, tuple[type, ...]] = {"default": (str,), "metric": (str,), "dataset": (str,),
                                               "id_tolerance": (float, int)}
#: ``[selection].metric``: the validation metrics a setting may be chosen on (higher is better).
SELECTION_METRICS = ("auroc", "aupr_out")
SECTIONS = ("benchmark", "pretrain", "finetune", "methods", "matrix", "selection", "comparisons")


@dataclass
class MethodSpec:
    """One row of the benchmark: a post-hoc score on the pretrained model, or a fine-tuning method."""

    label: str
    method: str
    score: str = "energy"
    gamma: float | None = None
    scratch: bool = False  # train from random init with the [pretrain] schedule instead of fine-tuning
    loss_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def posthoc(self) -> bool:
        return self.method in POSTHOC

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")

    @property
    def balanced(self) -> bool:
        return "balanced" in self.method


@dataclass(frozen=True)
class MatrixSpec:
    """The ``[matrix]`` section: every score in ``scores`` on the pretrained model and on every fine-tuned run, once
    per hyperparameter mode (``selected`` on the validation pair, or the papers' ``default``)."""

    scores: tuple[str, ...]
    modes: tuple[str, ...] = HYPERPARAMETER_MODES
    validation_outliers: str | None = None
    num_validation_outliers: int | None = None
    id_holdout: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SelectionSpec:
    """The ``[selection]`` section: which fine-tuned row is the paper's default, and what a row must beat it on."""

    default: str
    dataset: str
    metric: str = "auroc"
    id_tolerance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Comparison:
    """The claim "row ``better`` beats row ``than``" (labels of two rows), named ``label``."""

    better: str
    than: str
    label: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchmarkConfig:
    """A parsed, validated benchmark TOML (see the module docstring)."""

    name: str
    out: Path
    data_root: str | None
    device: str | None
    seeds: list[int]
    id_dataset: str
    arch: str
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    outliers: str
    ood_near: list[str]
    ood_far: list[str]
    num_ood: int | None
    methods: list[MethodSpec]
    pretrained: str | None = None
    protocol: str | None = None
    only: list[str] = field(default_factory=list)  # labels/slugs of the rows to run; empty = all
    only_seeds: list[int] = field(default_factory=list)  # fine-tuning seeds to run; empty = all of ``seeds``
    task: str = "classification"
    id_split: str = "test"
    matrix: MatrixSpec | None = None
    selection: SelectionSpec | None = None
    pretrain_seeds: list[int] = field(default_factory=list)  # nested seeds (one pretrained model each); [] = one
    comparisons: list[Comparison] = field(default_factory=list)
    blur: tuple[bool, ...] = (False,)  # segmentation: score maps as measured and/or blurred (BLUR_VARIANTS)

    def selected(self, spec: MethodSpec, seed: int | None = None) -> bool:
        """Whether this invocation may train/evaluate ``spec`` (the others are only tabulated) — with ``seed``, that
        seed of it. A post-hoc row has no seed: it belongs to the process that runs ``seeds[0]``."""
        if self.only and spec.label not in self.only and spec.slug not in self.only:
            return False
        if not self.only_seeds:
            return True
        if spec.posthoc:
            return self.seeds[0] in self.only_seeds
        return seed is None or seed in self.only_seeds

    @property
    def partial(self) -> bool:
        """Whether this invocation runs only part of the grid (``--only`` / ``--seed``), so that processes running
        other parts may share the output folder."""
        return bool(self.only or self.only_seeds)

    @property
    def groups(self) -> dict[str, str]:
        return {**dict.fromkeys(self.ood_near, "near"), **dict.fromkeys(self.ood_far, "far")}

    def train_config(self, stage: str, spec: MethodSpec | None, seed: int) -> TrainConfig:
        """The TrainConfig of pretraining (``stage="pretrain"``) or of one row's training (``"finetune"``).

        Pretraining: the :data:`PRETRAIN` recipe with ``[pretrain]``. A fine-tuning row: the task's fine-tuning
        recipe (classification: :data:`~oodtune.training.config.FINETUNE`) with ``[finetune]``, then the row's
        options. A ``scratch`` row: :data:`PRETRAIN` with ``[finetune]``, then
        ``[pretrain]`` (its schedule wins), then the row's options."""
        if stage == "pretrain":
            base, layers = PRETRAIN, [self.pretrain]
        elif spec is not None and spec.scratch:
            base, layers = PRETRAIN, [self.finetune, self.pretrain, spec.train]
        else:
            base, layers = TASK_REGISTRY[self.task].finetune_defaults, [self.finetune, spec.train if spec else {}]
        options = {k: v for layer in layers for k, v in layer.items() if k in TRAIN_KEYS}
        return base.replace(**{**options, "seed": seed, "device": self.device})


class _Checker:
    """Type and name checks that collect the file name into every message."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {msg}")

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a table ([{where}]), got {type(value).__name__}")
        return value

    def keys(self, table: dict[str, Any], allowed: dict[str, tuple[type, ...]], where: str) -> None:
        for key, value in table.items():
            if key not in allowed:
                raise self.fail(where, f"unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")
            self.value(value, allowed[key], f"{where}.{key}")

    def value(self, value: Any, types: tuple[type, ...], where: str) -> None:
        ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
                 or (t is float and isinstance(value, int) and not isinstance(value, bool)) for t in types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise self.fail(where, f"expected {names}, got {type(value).__name__} {value!r}")

    def names(self, values: list[Any], known: set[str], where: str, what: str) -> list[str]:
        out = []
        for v in values:
            if not isinstance(v, str):
                raise self.fail(where, f"expected a list of {what} names, got {v!r}")
            if canonical_name(v) not in known and not canonical_name(v).startswith(("folder:", "images:")):
                raise self.fail(where, f"unknown {what} {v!r}; known: {', '.join(sorted(known))}")
            out.append(v)
        return out


def _method_spec(chk: _Checker, raw: Any, index: int, segmentation: bool) -> MethodSpec:
    where = f"[[methods]] #{index + 1}"
    m = dict(chk.table(raw, where))
    chk.keys(m, METHOD_KEYS, where)
    for key in ("label", "method"):
        if key not in m:
            raise chk.fail(where, f"missing required key {key!r}")
    label, method = m.pop("label"), m.pop("method")
    where = f"[[methods]] {label!r}"
    score = m.pop("score", "energy")
    scores = PIXEL_SCORE_NAMES if segmentation else SCORE_NAMES
    if score not in scores:
        raise chk.fail(where, f"score {score!r} is not a score; choose one of {', '.join(scores)}")
    spec = MethodSpec(label=label, method=method, score=score, gamma=m.pop("gamma", None),
                      scratch=bool(m.pop("scratch", False)), train={k: m.pop(k) for k in list(m) if k in TRAIN_KEYS})
    spec.loss_options = m
    if spec.posthoc:
        if segmentation and method not in PIXEL_SCORE_NAMES:
            raise chk.fail(where, f"{method!r} is not a pixel score; segmentation post-hoc rows use one of "
                                  f"{', '.join(PIXEL_SCORE_NAMES)}")
        extra = sorted(k for k in (*spec.loss_options, *spec.train) if k)
        if extra or spec.gamma is not None or spec.scratch:
            raise chk.fail(where, f"{method!r} is a post-hoc score of the pretrained model; it takes no training or "
                                  f"loss options (got {extra or 'gamma/scratch'})")
        return spec
    losses = TASK_LOSSES["segmentation" if segmentation else "classification"]
    foreign = sorted(set(spec.loss_options) - set(losses.defaults))
    if foreign:
        raise chk.fail(where, f"loss option(s) {foreign} do not apply to {losses.task} methods; valid: "
                              f"{', '.join(losses.defaults)}")
    auto = [k for k, o in LOSS_OPTIONS.items() if o.auto]
    for k, o in LOSS_OPTIONS.items():
        value = spec.loss_options.get(k)
        if isinstance(value, str) and o.kind is not str and value != "auto":
            raise chk.fail(where, f"{k} must be a number or \"auto\", got {value!r}")
        if o.choices and value is not None and value not in o.choices:
            raise chk.fail(where, f"{k} must be one of {', '.join(o.choices)}, got {value!r}")
    try:  # the method name and which options it takes, checked now rather than after pretraining
        probe = {k: v for k, v in spec.loss_options.items() if v != "auto"}
        for k in auto:
            if spec.loss_options.get(k) == "auto":
                probe[k] = -30.0 if k == "m_in" else 0.0
        prior = [1.0, 1.0] if "balanced" in method else None
        if segmentation:
            build_pixel_loss(method, num_classes=2, ignore_index=None, prior_gamma=prior, **probe)
        else:
            build_method_loss(method, prior_gamma=prior, **probe)
    except ConfigError as exc:
        raise chk.fail(where, str(exc)) from None
    if spec.gamma is not None and not spec.balanced:
        raise chk.fail(where, f"gamma is the outlier prior's γ, used only by balanced-energy methods, not {method!r}")
    return spec


def _matrix_spec(chk: _Checker, raw: Any, known: set[str], protocol: dict[str, Any], ood: list[str]) -> MatrixSpec:
    m = chk.table(raw, "matrix")
    chk.keys(m, MATRIX_KEYS, "[matrix]")
    scores = m.get("scores", [])
    if not scores or not all(isinstance(s, str) and s in POSTHOC for s in scores) or len(set(scores)) != len(scores):
        raise chk.fail("[matrix].scores", f"expected a list of distinct score names from {', '.join(SCORE_NAMES)}; "
                                          f"got {scores!r}")
    modes = m.get("hyperparameters", list(HYPERPARAMETER_MODES))
    if not modes or not all(x in HYPERPARAMETER_MODES for x in modes) or len(set(modes)) != len(modes):
        raise chk.fail("[matrix].hyperparameters", f"expected a list of {' and/or '.join(HYPERPARAMETER_MODES)}, "
                                                   f"got {modes!r}")
    outliers = m.get("validation_outliers", protocol.get("aux_val"))
    if "selected" in modes:
        if outliers is None:
            raise chk.fail("[matrix]", "selected hyperparameters need validation_outliers: held-out auxiliary "
                                       "outliers such as tin-aux-val")
        outliers = chk.names([outliers], known, "[matrix].validation_outliers", "dataset")[0]
        if canonical_name(outliers) in {canonical_name(o) for o in ood}:
            raise chk.fail("[matrix].validation_outliers", f"{outliers!r} is an OOD test set of this benchmark; "
                                                           "hyperparameters are never chosen on a test set")
    for key in ("num_validation_outliers", "id_holdout"):
        if key in m and m[key] < 1:
            raise chk.fail(f"[matrix].{key}", f"must be >= 1, got {m[key]}")
    return MatrixSpec(scores=tuple(scores), modes=tuple(modes), validation_outliers=outliers,
                      num_validation_outliers=m.get("num_validation_outliers"), id_holdout=m.get("id_holdout", 1000))


def _selection_spec(chk: _Checker, raw: Any, methods: list[MethodSpec], ood: list[str]) -> SelectionSpec:
    sel = chk.table(raw, "selection")
    chk.keys(sel, SELECTION_KEYS, "[selection]")
    tuned = [m.label for m in methods if not m.posthoc]
    if sel.get("default") not in tuned:
        raise chk.fail("[selection].default", f"expected the label of a fine-tuned [[methods]] row ({', '.join(tuned)})"
                                              f", got {sel.get('default')!r}")
    metric = sel.get("metric", "auroc")
    if metric not in SELECTION_METRICS:
        raise chk.fail("[selection].metric", f"one of {', '.join(SELECTION_METRICS)}, got {metric!r}")
    if "dataset" not in sel and len(ood) != 1:
        raise chk.fail("[selection].dataset", f"this benchmark has {len(ood)} OOD sets ({', '.join(ood)}); name the "
                                              "held-out one the setting is chosen on")
    dataset = sel.get("dataset", ood[0])
    if canonical_name(dataset) not in {canonical_name(o) for o in ood}:
        raise chk.fail("[selection].dataset", f"{dataset!r} is not an OOD set of this benchmark ({', '.join(ood)})")
    tolerance = sel.get("id_tolerance")
    if tolerance is not None and tolerance < 0:
        raise chk.fail("[selection].id_tolerance", f"must be >= 0 points, got {tolerance}")
    return SelectionSpec(default=sel["default"], dataset=next(o for o in ood if canonical_name(o) ==
                                                              canonical_name(dataset)),
                         metric=metric, id_tolerance=None if tolerance is None else float(tolerance))


def _comparisons(chk: _Checker, raw: Any, labels: list[str]) -> list[Comparison]:
    if not isinstance(raw, list) or not raw:
        raise chk.fail("[[comparisons]]", "must be an array of tables ([[comparisons]] blocks with better = ROW, "
                                          "than = ROW)")
    out = []
    for i, c in enumerate(raw):
        where = f"[[comparisons]] #{i + 1}"
        c = chk.table(c, where)
        chk.keys(c, COMPARISON_KEYS, where)
        for key in ("better", "than"):
            if c.get(key) not in labels:
                raise chk.fail(f"{where}.{key}", f"expected the label of a [[methods]] row ({', '.join(labels)}), "
                                                 f"got {c.get(key)!r}")
        if c["better"] == c["than"]:
            raise chk.fail(where, f"compares {c['better']!r} with itself")
        out.append(Comparison(c["better"], c["than"], c.get("label", f"{c['better']} vs {c['than']}")))
    if len({c.label for c in out}) != len(out):
        raise chk.fail("[[comparisons]]", "labels must be distinct")
    return out


def _pretrain_seeds(chk: _Checker, b: dict[str, Any], pre: dict[str, Any]) -> list[int]:
    seeds = b.get("pretrain_seeds", [])
    if "pretrain_seeds" not in b:
        return []
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise chk.fail("[benchmark].pretrain_seeds", f"expected a non-empty list of distinct integers, got {seeds!r}")
    if "pretrained" in b:
        raise chk.fail("[benchmark]", "pretrain_seeds pretrains one model per seed; it cannot be combined with "
                                      "pretrained = CHECKPOINT (remove one of them)")
    if "seed" in pre:
        raise chk.fail("[pretrain].seed", "with [benchmark].pretrain_seeds each model's seed comes from that list; "
                                          "remove [pretrain].seed")
    return list(seeds)


def load_benchmark_config(path: str | Path, *, data_root: str | None = None, device: str | None = None,
                          out: str | None = None, only: list[str] | None = None,
                          only_seeds: list[int] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark TOML (module docstring); command-line overrides win over the file.

    ``only``: run just these rows, named by label or slug (e.g. to spend a short GPU run on the rows a
    previous one did not finish); the other rows are tabulated from their finished runs, as with
    ``report_only``. An unknown name is an error that lists the valid ones. ``only_seeds``: run just these
    fine-tuning seeds (of ``[benchmark].seeds``) of those rows, so that processes running different seeds share
    one grid; post-hoc rows run with the first seed.
    """
    path = Path(path)
    chk = _Checker(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read benchmark config {path}: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise chk.fail("top level", f"unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    b = chk.table(raw.get("benchmark", {}), "benchmark")
    chk.keys(b, BENCHMARK_KEYS, "[benchmark]")
    pre = chk.table(raw.get("pretrain", {}), "pretrain")
    chk.keys(pre, {**{k: v for k, v in TRAIN_TYPES.items() if k != "device"}, **PRETRAIN_EXTRA}, "[pretrain]")
    fine = chk.table(raw.get("finetune", {}), "finetune")
    chk.keys(fine, {k: v for k, v in TRAIN_TYPES.items() if k not in ("seed", "device")}, "[finetune]")
    methods_raw = raw.get("methods", [])
    if not isinstance(methods_raw, list):
        raise chk.fail("[[methods]]", f"[[methods]] must be an array of tables (one [[methods]] block per row), got "
                                      f"a {'table ([methods])' if isinstance(methods_raw, dict) else 'value'}")
    if not methods_raw:
        raise chk.fail("[[methods]]", "no [[methods]] entries; add at least one row (label + method)")
    protocol_id = PROTOCOLS.get(b.get("protocol", ""), {}).get("id", "cifar10")
    segmentation = is_segmentation_set(str(b.get("id_dataset", protocol_id)))
    if segmentation and "pretrained" not in b:
        raise chk.fail("[benchmark]", "a segmentation benchmark needs pretrained = \"CHECKPOINT\" (segmenters are "
                                      "imported: oodtune import-model WEIGHTS --arch ... --dataset ... --out "
                                      "CHECKPOINT)")
    if segmentation and "matrix" in raw:
        raise chk.fail("[matrix]", "the score x model matrix (with hyperparameter selection) is implemented for "
                                   "classification benchmarks only; remove the [matrix] section")
    methods = [_method_spec(chk, m, i, segmentation) for i, m in enumerate(methods_raw)]
    labels = [m.label for m in methods]
    slugs = [m.slug for m in methods]
    if len(set(slugs)) != len(slugs):
        raise chk.fail("[[methods]]", f"labels must be distinct (also after lower-casing): {labels}")
    protocol: dict[str, Any] = {}
    if "protocol" in b:
        if b["protocol"] not in PROTOCOLS:
            raise chk.fail("[benchmark].protocol", f"unknown protocol {b['protocol']!r}; known: {', '.join(PROTOCOLS)}")
        protocol = PROTOCOLS[b["protocol"]]
    known = {canonical_name(n) for n in available_datasets()}
    ood_near = chk.names(b.get("ood_near", protocol.get("near", [])), known, "[benchmark].ood_near", "dataset")
    ood_far = chk.names(b.get("ood_far", protocol.get("far", [])), known, "[benchmark].ood_far", "dataset")
    if not ood_near and not ood_far:
        raise chk.fail("[benchmark]", "no OOD sets: give ood_near and/or ood_far (or a protocol)")
    id_dataset = chk.names([b.get("id_dataset", protocol.get("id", "cifar10"))], known, "[benchmark].id_dataset",
                           "dataset")[0]
    default_aux = TASK_REGISTRY["segmentation" if segmentation else "classification"].default_outliers
    outliers = chk.names([b.get("outliers", protocol.get("aux", default_aux))], known, "[benchmark].outliers",
                         "dataset")[0]
    seeds = b.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise chk.fail("[benchmark].seeds", f"expected a non-empty list of integers, got {seeds!r}")
    unknown_seeds = sorted(set(only_seeds or []) - set(seeds))
    if unknown_seeds:
        raise ConfigError(f"--seed {', '.join(map(str, unknown_seeds))}: not in [benchmark].seeds {seeds} of {path}")
    blur = b.get("blur", "off")
    if blur not in BLUR_VARIANTS or (blur != "off" and not segmentation):
        raise chk.fail("[benchmark].blur", f"{blur!r}: one of {', '.join(BLUR_VARIANTS)}, for segmentation "
                       "benchmarks only (the Gaussian blur of per-pixel score maps)")
    if only:
        names = {n for m in methods for n in (m.label, m.slug)}
        missing = [n for n in only if n not in names]
        if missing:
            raise ConfigError(f"--only {', '.join(missing)}: {path} has no such row; choose from the slugs "
                              f"{slugs} (or the labels).")
    cfg = BenchmarkConfig(
        name=b.get("name", path.stem), out=Path(out or b.get("out", f"runs/{path.stem}")),
        data_root=data_root or b.get("data_root"), device=device or b.get("device"), seeds=list(seeds),
        id_dataset=id_dataset, pretrain=dict(pre), finetune=dict(fine),
        arch=b.get("arch", f"checkpoint {b.get('pretrained')}" if segmentation else "wrn-40-2"),
        outliers=outliers, ood_near=ood_near, ood_far=ood_far, num_ood=b.get("num_ood"), methods=methods,
        pretrained=b.get("pretrained"), protocol=b.get("protocol"), only=list(only or []),
        only_seeds=list(only_seeds or []),
        task="segmentation" if segmentation else "classification", id_split=b.get("id_split", "test"),
        matrix=_matrix_spec(chk, raw["matrix"], known, protocol, ood_near + ood_far) if "matrix" in raw else None,
        selection=_selection_spec(chk, raw["selection"], methods, ood_near + ood_far) if "selection" in raw else None,
        pretrain_seeds=_pretrain_seeds(chk, b, pre),
        comparisons=_comparisons(chk, raw["comparisons"], labels) if "comparisons" in raw else [],
        blur=BLUR_VARIANTS[blur],
    )
    try:  # every training configuration is built once now, so a bad value fails before any work
        cfg.train_config("pretrain", None, 0)
        for spec in methods:
            if not spec.posthoc:
                tc = cfg.train_config("finetune", spec, 0)
                if not segmentation and (tc.train_part, tc.paste_mode, tc.paste_share) != (None, "object", None):
                    raise ConfigError(f"row {spec.label!r}: train_part, paste_mode and paste_share are segmentation "
                                      "options; a classifier fine-tunes every layer on auxiliary images.")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg
