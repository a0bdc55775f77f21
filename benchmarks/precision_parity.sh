#!/usr/bin/env bash
# bf16 (autocast + channels_last, the CPU fast path) vs fp32 at CPU scale, paired seeds: each seed fine-tunes the
# same starting model with the same data order in both precisions and evaluates in the precision it trained in.
# * classification: a WRN-16-1 pretrained 3 epochs on a seeded 10,000-image CIFAR-10 subsample (once, in the
#   default precision, shared by both arms), fine-tuned with Energy-OE for 20 steps of 128 ID + 256 Tiny ImageNet
#   outliers at lr 0.01, margins m_in -6, m_out -2 (around this weak model's median energies, -3.7 ID train and
#   -3.6 outliers; given, so no run spends a pass over the outliers on them); test accuracy, and AUROC / FPR95 of
#   the energy score on tin-near and dtd (500 images each);
# * segmentation: the published CamVid ESPNet at 320x240 scored as shipped (no training: it is deterministic, so
#   one run per precision), CamVid test mIoU and Road Anomaly pixel AUROC / FPR95 of the energy score.
# The pretraining arm (WRN-16-1, 10 epochs, 3 seeds) is results/speed/cpu_precision_parity.json.
#   bash benchmarks/precision_parity.sh DATA_ROOT OUT [SEEDS...]   (default 0 1 2; one thread per process)
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
for s in $SEEDS; do
  for p in fp32 bf16; do
    c=cls-$p-s$s
    [ -f "$OUT/$c/model.pt" ] || run "$c" finetune "$OUT/base/model.pt" --method energy-oe --m-in -6 --m-out -2 --epochs 1 \
      --max-steps-per-epoch 20 --lr 0.01 --seed "$s" --precision $p --device cpu --threads 1 --data-root "$DATA" \
      --out "$OUT/$c"
    [ -f "$OUT/$c.json" ] || run "$c" evaluate "$OUT/$c/model.pt" --score energy --ood tin-near --ood dtd \
      --num-ood 500 --precision $p --device cpu --threads 1 --data-root "$DATA" --out "$OUT/$c.json"
  done
done
[ -f "$OUT/espnet.pt" ] || run seg-import import-model "$DATA/espnet/espnet_p_2_q_8_camvid.pth" --arch espnet-camvid \
  --dataset camvid --input-size 320x240 --no-check-accuracy --data-root "$DATA" --out "$OUT/espnet.pt"
for p in fp32 bf16; do
  [ -f "$OUT/seg-$p-s0.json" ] || run "seg-$p" evaluate "$OUT/espnet.pt" --score energy --ood road-anomaly \
    --precision $p --device cpu --threads 1 --data-root "$DATA" --out "$OUT/seg-$p-s0.json"
done
python benchmarks/parity_table.py "$OUT" $SEEDS
