# Shared set-up of the scripts/gpu/*.sh tools: run a piece of GPU work inside a per-call wall-time limit on a
# machine that receives the working tree (no install: run from source) and returns files written under $OUT.
#
# Variables (all optional):
#   BUDGET     seconds this call may spend, for everything it runs (default 560); the scripts stop their work
#              cleanly before it runs out, and every long step is resumable, so the next call continues it
#   DEADLINE   absolute end time (epoch seconds); set by the first script that sources this file, shared by the rest
#   DATA       data root on the GPU machine (default .devdata, built by scripts/gpu/make_devdata.py)
#   OUT        folder whose files come back (default ./gpu-out)
#   SPLIT_MB   files larger than this are shipped in parts NAME.partNN (default 15; rejoin with cat)
#   RUNS       where runs live on the GPU machine (default /tmp/runs)
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OODTUNE_CACHE=${OODTUNE_CACHE:-/tmp/oodtune-cache} OODTUNE_PROGRESS=0
DATA=${DATA:-.devdata}
OUT=${OUT:-./gpu-out}
RUNS=${RUNS:-/tmp/runs}
SPLIT_MB=${SPLIT_MB:-15}
mkdir -p "$OUT" "$RUNS"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
export DEADLINE=${DEADLINE:-$(( T0 + ${BUDGET:-560} ))}
left() { echo $(( DEADLINE - $(date +%s) )); }
# ship FILE NAME: copy FILE into $OUT as NAME.partNN pieces of at most SPLIT_MB MiB
ship() { split -b "${SPLIT_MB}M" -d "$1" "$OUT/$2.part"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
