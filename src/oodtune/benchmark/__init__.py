"""A reproducible grid over the pipeline: one pretrained checkpoint -> post-hoc baselines + fine-tuning methods x
seeds x OOD sets, resumable, tabulated as mean ± std over seeds.

:mod:`.config` reads and validates the TOML file, :mod:`.provenance` refuses finished runs trained with other
settings than the file asks for, :mod:`.grid` runs the missing pieces (each a :mod:`oodtune.pipeline` call),
:mod:`.store` caches what is computed from a checkpoint under keys made of its inputs, :mod:`.tables` writes
results.json / results.md (both FPR95 conventions, every seed), :mod:`.matrix` the optional score × model matrix
(matrix.json / matrix.md).
"""

from .config import POSTHOC, BenchmarkConfig, MatrixSpec, MethodSpec, load_benchmark_config
from .examples import example_configs, find_config
from .grid import Benchmark, run_benchmark
from .tables import mean_std, per_seed, summarize, write_results

__all__ = ["POSTHOC", "Benchmark", "BenchmarkConfig", "MatrixSpec", "MethodSpec", "example_configs", "find_config",
           "load_benchmark_config", "mean_std", "per_seed", "run_benchmark", "summarize", "write_results"]
