#!/usr/bin/env bash
# bf16 (autocast + channels_last, the CPU fast path) vs fp32 at CPU scale, paired seeds: each seed fine-tunes the
# same starting model with the same data order in both precisions and evaluates in the precision it trained in.
# * classification: a WRN-16-1 pretrained 3 epochs on a seeded 10,000-image CIFAR-10 subsample (once, shared by
#   both arms), fine-tuned with Energy-OE for 30 steps (128 ID + 256 Tiny ImageNet outliers, lr 0.01, margins
#   proposed once in fp32); test accuracy, AUROC and FPR95 (energy score) on tin-near and dtd (1,000 images each);
# * segmentation (after every classification seed): the published CamVid ESPNet at 320x240, its last block
#   fine-tuned with pixel Energy-OE for 20 steps (4 frames, 2 with a pasted COCO object, lr 1e-3, the margins
#   propose-margins gives this model: m_in -9.15, m_out -3.95, results/segmentation/README.md); CamVid test mIoU
#   and Road Anomaly pixel AUROC / FPR95 (energy score).
# The pretraining arm (WRN-16-1, 10 epochs, 3 seeds) is results/speed/cpu_precision_parity.json.
#   OMP_NUM_THREADS=1 bash benchmarks/precision_parity.sh DATA_ROOT OUT [SEEDS...]   (default 0 1 2)
# Prints the paired table (benchmarks/parity_table.py) and writes OUT/precision_parity.json.
set -eu
DATA=$1 OUT=$2
shift 2
SEEDS=${*:-0 1 2}
export OODTUNE_PROGRESS=0
OOD=${OODTUNE_BIN:-oodtune}
mkdir -p "$OUT"
run() { local log=$1; shift; "$OOD" "$@" >> "$OUT/$log.log" 2>&1 || { tail -20 "$OUT/$log.log"; exit 1; }; }

[ -f "$OUT/base/model.pt" ] || run base pretrain --dataset cifar10 --arch wrn-16-1 --epochs 3 --num-train 10000 \
  --seed 0 --device cpu --threads 1 --data-root "$DATA" --out "$OUT/base"
grep -q -- --m-in "$OUT/margins.txt" 2>/dev/null || "$OOD" propose-margins "$OUT/base/model.pt" --outliers tin-aux --device cpu \
  --threads 1 --precision fp32 --data-root "$DATA" > "$OUT/margins.txt"
M_IN=$(grep -o -- '--m-in [-0-9.e]*' "$OUT/margins.txt" | head -1 | cut -d' ' -f2)
M_OUT=$(grep -o -- '--m-out [-0-9.e]*' "$OUT/margins.txt" | head -1 | cut -d' ' -f2)
[ -f "$OUT/espnet.pt" ] || run seg-import import-model "$DATA/espnet/espnet_p_2_q_8_camvid.pth" --arch espnet-camvid \
  --dataset camvid --input-size 320x240 --no-check-accuracy --data-root "$DATA" --out "$OUT/espnet.pt"
S_IN=-9.15 S_OUT=-3.95

for s in $SEEDS; do
  for p in fp32 bf16; do
    c=cls-$p-s$s
    [ -f "$OUT/$c/model.pt" ] || run "$c" finetune "$OUT/base/model.pt" --method energy-oe --m-in "$M_IN" \
      --m-out "$M_OUT" --epochs 1 --max-steps-per-epoch 30 --lr 0.01 --seed "$s" --precision $p --device cpu \
      --threads 1 --data-root "$DATA" --out "$OUT/$c"
    [ -f "$OUT/$c.json" ] || run "$c" evaluate "$OUT/$c/model.pt" --score energy --ood tin-near --ood dtd \
      --num-ood 1000 --precision $p --device cpu --threads 1 --data-root "$DATA" --out "$OUT/$c.json"
  done
done
for s in $SEEDS; do
  for p in fp32 bf16; do
    g=seg-$p-s$s
    [ -f "$OUT/$g/model.pt" ] || run "$g" finetune "$OUT/espnet.pt" --method energy-oe --m-in "$S_IN" \
      --m-out "$S_OUT" --epochs 1 --max-steps-per-epoch 20 --batch-size 4 --outlier-batch-size 2 --lr 1e-3 \
      --seed "$s" --precision $p --device cpu --threads 1 --data-root "$DATA" --out "$OUT/$g"
    [ -f "$OUT/$g.json" ] || run "$g" evaluate "$OUT/$g/model.pt" --score energy --ood road-anomaly \
      --precision $p --device cpu --threads 1 --data-root "$DATA" --out "$OUT/$g.json"
  done
done
python benchmarks/parity_table.py "$OUT" $SEEDS
