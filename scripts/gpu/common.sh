# Sourced by the scripts/gpu/*.sh session scripts (run on the lent H100 through the device tool).
# The working tree arrives without an install: run from source, cache decoded data in /tmp.
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OODTUNE_CACHE=/tmp/oodtune-cache OODTUNE_PROGRESS=0
DATA=${DATA:-.devdata}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
# One deadline for everything a device call runs (BUDGET seconds from the first script that sources this).
export DEADLINE=${DEADLINE:-$(( T0 + ${BUDGET:-560} ))}
left() { echo $(( DEADLINE - $(date +%s) )); }
oodtune() { python -m oodtune.cli "$@"; }
# The device tool returns files of at most 16 MiB: ship big checkpoints in parts (rejoin with cat).
ship() { split -b 15M -d "$1" "$OUT/$2.part"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
