#!/usr/bin/env bash
# A stronger base editor from one GPU call: `rcgrpo pretrain` of the shipped editor's architecture on
# ShapesEdit, text encoders trained too, for a fixed time (<= 10 minutes on one H100, no network).
# The CPU pretrains for ~1 hour at batch 32; this trains at batch 256 for 5 minutes of H100 time.
# Writes to --out (default: $OUT, else runs/gpu-pretrain): editor.tar.gz (the editor directory with its
# model card), README.md and model_card.json (the model card: per-kind adherence and within-group
# spread at the default run's exploration), gpu-pretrain.log.
#
#   scripts/gpu-check.sh --download        # here, once: the wheels both GPU scripts carry (wheelhouse/gpu-check)
#   scripts/gpu-pretrain.sh                # on the GPU machine: carry wheelhouse/gpu-check with the tree
#   scripts/gpu-pretrain.sh --cpu-smoke    # the reduced form on CPU: the same command at toy size, no install
#
# Then, here: `tar xzf editor.tar.gz -C runs && rcgrpo train --set editor=runs/editor` over the seeds
# of the shipped editor's runs; the editor is shipped only if the default run gains more on it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-lib.sh
mode=gpu
out=${OUT:-runs/gpu-pretrain}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode=cpu ;;
    --out) out=$2; shift ;;
    *) echo "usage: scripts/gpu-pretrain.sh [--cpu-smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python3}
started=$SECONDS
gpu_begin gpu-pretrain "$out" "$mode"
work=$(mktemp -d)  # the editor and its per-cycle copies: only the final one comes back, as one file

# A fresh transformer and text encoders on the shipped editor's VAE (so the latent space stays put).
# Sized for the lease: 50,000 samples take ~1 min to generate, the transformer trains for 300 s in
# 2,000-step cosine cycles (it stops at the last cycle's end that fits), the card scores 256 samples.
if [ "$mode" = gpu ]; then
  site=$(gpu_site "$python")
  export PYTHONPATH="$site:$PYTHONPATH"
  echo "installed in $((SECONDS - started)) s"
  sizes=(--device cuda --threads 8 --train-samples 50000 --flow-batch-size 256 --flow-steps 1000000
    --flow-cycle-steps 2000 --flow-seconds 300 --eval-samples 256)
else
  sizes=(--device cpu --threads 1 --train-samples 64 --flow-batch-size 8 --flow-steps 1000000
    --flow-cycle-steps 4 --flow-seconds 2 --eval-samples 8)
fi
"$python" -m deploy.commands.pretrain --out "$work/editor" --vae-from rcgrpo/assets/tiny_kontext_shapes \
  --train-text-encoders --seed 1 "${sizes[@]}"
rm -rf "$work/editor/cycles"
cp "$work/editor/README.md" "$work/editor/model_card.json" "$out/"
tar czf "$out/editor.tar.gz" -C "$work" editor
echo "gpu-pretrain: done in $((SECONDS - started)) s; $out/editor.tar.gz ($(du -h "$out/editor.tar.gz" | cut -f1))"
