#!/bin/bash
# The recipe behind the four shipped models (the rows of the paper's table): every row starts from the same
# 5,000-step fp32 model and trains STEPS more steps with the same settings, so they differ only in [quant].
#
#   bash examples/bittts/scripts/train_table.sh INIT.safetensors RUNS_DIR [PRESET ...]
#
# INIT: the float starting point (the shipped models started from the 5,000-step fp32 export of the earlier
# release, sha256 in the model card). RUNS_DIR holds the corpus (RUNS_DIR/data, made by
# `bittts prepare --out RUNS_DIR/data --sentences 3000`) and one run directory per preset. Re-running resumes.
# Settings (why: docs/bittts.md, "Training on a CPU"): batch 8, one thread per run (two runs share two cores),
# no discriminators (loss.adv_start beyond the run), the training-only mel head, the multi-resolution STFT loss,
# a 500-step aligner warm-up on the frozen encoder, the binarization loss from step 250.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 INIT.safetensors RUNS_DIR [PRESET ...] (default presets: fp32 all acoustic 4bit)" >&2
    exit 2
fi
INIT=$1
RUNS=$2
shift 2
PRESETS=("$@")
[ ${#PRESETS[@]} -eq 0 ] && PRESETS=(fp32 all acoustic 4bit)
for preset in "${PRESETS[@]}"; do
    resume=()
    [ -f "$RUNS/$preset/checkpoint.pt" ] && resume=(--resume)
    bittts train --data "$RUNS/data" --out "$RUNS/$preset" --preset "$preset" "${resume[@]}" \
        --init-from "$INIT" --steps "${STEPS:-1800}" \
        --set train.batch_size=8 --set train.threads=1 --set train.lr=3e-4 --set loss.adv_start=20000 \
        --set loss.lambda_mel_aux=1.0 --set loss.lambda_stft=20 --set loss.bin_loss_start=250 \
        --set loss.bin_loss_ramp=250 --set train.aligner_warmup=500 \
        --set train.ckpt_every=100 --set train.image_every=400 --set train.log_every=25
    name=$preset; [ "$preset" = all ] && name=ternary  # the `all` preset ships as bittts-ternary
    bittts export "$RUNS/$preset" -o "$RUNS/bittts-$name.safetensors"
done
