#!/usr/bin/env bash
# Can the unaligned demo's generator draw the classes it trains on, when there are only a few? The default model
# and recipe on the first N training classes of an unaligned demo (`fsdit demo --data unaligned --until encoder`),
# through the CLI; then samples of 4 of those training classes (CFG 3, 15 and 100 Euler steps), one grid each.
#
#   bench/unaligned_subset.sh DEMO OUT [N=16]
#
# N classes split 12/2/2 for the default N; 2,000 steps of 32 (with 12 training classes of 20 images, every image is
# seen about 270 times).
set -euo pipefail
demo=$(cd "$1" && pwd); out=$2; n=${3:-16}
mkdir -p "$out/src"
for c in $(ls "$demo/split/train" | head -"$n"); do ln -sfn "$demo/split/train/$c" "$out/src/$c"; done
fsdit prepare    --src "$out/src" --dst "$out/split" --train $(( n * 3 / 4 )) --val $(( n / 8 )) --test $(( n - n * 3 / 4 - n / 8 )) --seed 0
fsdit precompute --data "$out/split" --out "$out/feats" --stand-in --image-size 24 --channels 3 --encoder "$demo/encoder"
fsdit train      --feats "$out/feats" --out "$out/run" --model mu --preset short --model.hidden 128 --model.depth 4 \
                 --model.heads 4 --model.patch 3 --model.cond support --mirror false --batch-size 32 --max-steps 2000 \
                 --lr 2e-3 --warmup 200 --ema-decay 0.9975 --cfg-scale 3 --cfg-interval 0.6 0.9 --sample-steps 15 \
                 --save-every 1000 --eval-every 1000 --sample-every 2000 --fewshot-every 0 --wandb-mode disabled
for c in $(ls "$out/split/train" | head -4); do
  fsdit sample --run "$out/run" --class-dir "$out/split/train/$c" --n 8 --cfg 3 --out "$out/seen_$c.png"
  fsdit sample --run "$out/run" --class-dir "$out/split/train/$c" --n 8 --cfg 3 --cfg-interval 0 1 --steps 100 --out "$out/seen100_$c.png"
done
