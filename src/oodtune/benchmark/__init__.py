"""A reproducible grid over the pipeline: one pretrained checkpoint -> post-hoc baselines + fine-tuning methods x
seeds x OOD sets, resumable, tabulated as mean ± std over seeds.

:mod:`.config` reads and validates the TOML file, :mod:`.provenance` refuses finished runs trained with other
settings than the file asks for, :mod:`.grid` runs the missing pieces (each a :mod:`oodtune.pipeline` call),
:mod:`.store` caches what is computed from a checkpoint under keys made of its inputs, :mod:`.tables` writes
results.json / results.md (both FPR95 conventions, every seed), :mod:`.matrix` the optional score × model matrix
(matrix.json / matrix.md), :mod:`.compare` nested seeds (one pretrained model per seed) and the comparisons'
paired differences with hierarchical bootstrap CIs (comparisons.md, forest.png), :mod:`.merge` takes the runs of
another output folder of the same benchmark into this one.
"""

from .compare import run_nested, write_comparisons
from .config import POSTHOC, BenchmarkConfig, Comparison, MatrixSpec, MethodSpec, load_benchmark_config
from .examples import example_configs, find_config
from .grid import Benchmark, run_benchmark
from .merge import MergeSummary, merge_outputs
from .tables import mean_std, per_seed, summarize, write_results

__all__ = ["POSTHOC", "Benchmark", "BenchmarkConfig", "Comparison", "MatrixSpec", "MergeSummary", "MethodSpec",
           "example_configs", "find_config", "load_benchmark_config", "mean_std", "merge_outputs", "per_seed",
           "run_benchmark", "run_nested", "summarize", "write_comparisons", "write_results"]
