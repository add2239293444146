#!/usr/bin/env bash
# The own-images path on a real colour data set, through the command line alone: prepare -> precompute ->
# train -> sample, then one grid of held-out classes (5 supports | 8 samples a row, enlarged 4x).
#
#   bench/emoji_cli.sh EMOJI OUT [COND] [extra fsdit train flags...]
#   ENCODER=DIR VAE=DIR bench/emoji_cli.sh EMOJI OUT [COND] [extra fsdit train flags...]
#
# EMOJI is a flat class-folder set `bench/emoji_set.py` makes (323 classes, 18-24 images each, 32 px). COND is the
# conditioning (default: support, the seed's).
# - Without ENCODER: the offline stand-ins of the glyph demo's default (pixel space and the random pixel projection;
#   width 128, depth 4, patch 4 -> 64 tokens; 2,200 steps of 32, lr 2e-3).
# - With ENCODER and VAE (`bench/emoji_encoder.py`: a stand-in encoder and autoencoder trained on a vendor the set
#   leaves out): the recipe a miniImageNet run uses, in latents (16x16x4 at patch 2 -> 64 tokens), with the
#   unaligned glyph demo's model and budget (width 128, depth 4, 3x3 convolutions of 32; 4,400 steps of 32) and
#   encoder guidance 1 when sampling, as `fsdit precompute --encoder ENCODER --vae VAE` and `fsdit sample --guide`.
# A few minutes of a 2-core CPU (pixels) or about 15 (latents). OUT/heldout_COND.png is the grid.
set -euo pipefail
src=$1; out=$2; cond=${3:-support}; shift 3 || shift $#
fsdit prepare    --src "$src" --dst "$out/split" --train 223 --val 30 --test 70 --seed 0
if [[ -n "${ENCODER:-}" ]]; then
  fsdit precompute --data "$out/split" --out "$out/feats" --encoder "$ENCODER" --vae "${VAE:?VAE=DIR goes with ENCODER}" --image-size 32
  recipe=(--model.patch 2 --model.conv 32 --max-steps 4400 --save-every 1100 --eval-every 2200 --sample-every 4400
          --cfg-scale 8 --guide-scale 1)
else
  fsdit precompute --data "$out/split" --out "$out/feats" --stand-in --image-size 32
  recipe=(--model.patch 4 --max-steps 2200 --save-every 1100 --eval-every 1100 --sample-every 2200 --cfg-scale 3)
fi
fsdit train      --feats "$out/feats" --out "$out/run_$cond" --model mu --preset short --model.hidden 128 \
                 --model.depth 4 --model.heads 4 --model.cond "$cond" --mirror false \
                 --batch-size 32 --lr 2e-3 --warmup 200 --ema-decay 0.9975 \
                 --cfg-interval 0.6 0.9 --sample-steps 15 --fewshot-every 0 --wandb-mode disabled "${recipe[@]}" "$@"
classes=$(ls "$out/split/test" | head -8)
for c in $classes; do
  fsdit sample --run "$out/run_$cond" --class-dir "$out/split/test/$c" --n 8 --seed 0 \
               --out "$out/grids_$cond/$c.png" --npz "$out/grids_$cond/$c.npz"
done
python - "$out" "$cond" $classes <<'EOF'
import sys, numpy as np
from pathlib import Path
from fsdit.images import class_rows_grid, save_png
out, cond, classes = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
zs = [np.load(out / f'grids_{cond}' / f'{c}.npz') for c in classes]      # the supports each sample call drew
save_png(class_rows_grid([z['supports'] for z in zs], [z['samples'] for z in zs], scale=4,
                         titles=('5 supports', f'8 samples, cond {cond}')),
         out / f'heldout_{cond}.png')
print(out / f'heldout_{cond}.png')
EOF
