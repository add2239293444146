#!/usr/bin/env bash
# Does the DiT read its pooled embedding once it sees each class often enough? The unaligned demo's default model and
# recipe (xattn, width 128, depth 4, patch 2, 3x3 convolutions of 32; batch 32) on the first N training classes of an
# unaligned demo, in the demo's VAE latents with its encoder, through the CLI; then `bench/own_embedding.py` on those
# classes at each quarter of the run. With all 700 classes and the demo's 4,400 steps each class is seen about 200
# times; with N = 50, about 2,800 at 4,400 steps and 11,100 at 16,000.
#
#   bench/unaligned_per_class.sh DEMO OUT [N=50] [STEPS=4400]
#
# DEMO is a finished `fsdit demo --data unaligned` folder (its split, encoder, VAE and judge are used). About 15
# minutes of a 2-core CPU at the defaults, an hour at STEPS=16000. Each checkpoint (every STEPS/4) is read through a
# run folder of its own, OUT/at/STEP, that links the run's config and that one checkpoint. One JSON row of
# `bench/own_embedding.py` a checkpoint, on the N - 4 training classes (the cosine schedule is the whole run's, so
# the points before the last are mid-schedule).
set -euo pipefail
demo=$(cd "$1" && pwd); out=$2; n=${3:-50}; steps=${4:-4400}; every=$(( steps / 4 ))
mkdir -p "$out/src"; out=$(cd "$out" && pwd)
for c in $(ls "$demo/split/train" | head -"$n"); do ln -sfn "$demo/split/train/$c" "$out/src/$c"; done
fsdit prepare    --src "$out/src" --dst "$out/split" --train $(( n - 4 )) --val 2 --test 2 --seed 0
fsdit precompute --data "$out/split" --out "$out/feats" --image-size 24 --encoder "$demo/encoder" --vae "$demo/vae"
fsdit train      --feats "$out/feats" --out "$out/run" --model mu --preset short --model.hidden 128 --model.depth 4 \
                 --model.heads 4 --model.patch 2 --model.conv 32 --model.context_patch 3 --model.cond xattn \
                 --mirror false --batch-size 32 --max-steps "$steps" --lr 2e-3 --warmup 200 --ema-decay 0.9975 \
                 --cfg-scale 4 --cfg-interval 0.6 0.9 --sample-steps 20 --save-every "$every" --keep 8 \
                 --eval-every "$every" --sample-every "$steps" --fewshot-every 0 --wandb-mode disabled
ln -sfn "$demo/judge" "$out/judge"
for s in $(ls "$out/run/checkpoints" | sort -n); do
  [[ $s =~ ^[0-9]+$ ]] && [ $(( s % every )) -eq 0 ] || continue
  at="$out/at/$s"; mkdir -p "$at/checkpoints"
  for f in "$out"/run/*.json*; do ln -sfn "$f" "$at/$(basename "$f")"; done
  ln -sfn "$out/run/checkpoints/$s" "$at/checkpoints/$s"
  python "$(dirname "$0")/own_embedding.py" "$out" --run "$at" --split train --classes $(( n - 4 ))
done
