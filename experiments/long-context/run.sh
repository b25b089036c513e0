#!/bin/bash
# Long-context demonstration: study-moe trained at 8192 tokens per sequence on synthetic
# passkey texts of up to 8192 tokens, once with each sequence split over mesh.context=4
# (4 CPU devices) and once whole on one device; then passkey retrieval at the training
# length. Writes runs/long-context/ and experiments/long-context/passkey-context4/.
#   bash experiments/long-context/run.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1
steps="${1:-10}"
export JAX_PLATFORMS=cpu
moe passkey-corpus runs/long-context/corpus.jsonl --tokenizer experiments/tokenizer/stdlib-4k.model \
  --max-tokens 8192 --no-progress
common=(configs/study-moe.yaml --no-progress 'data.paths=[runs/long-context/corpus.jsonl]' data.val_fraction=0.02
  train.seq_len=8192 model.max_seq_len=8192 train.batch_size=1 "train.steps=$steps" train.warmup_steps=2
  train.eval_every=5 train.eval_batches=1 checkpoint.every_steps=5 data.workers=0)
XLA_FLAGS=--xla_force_host_platform_device_count=4 moe train "${common[@]}" --run-dir runs/long-context/context4 \
  mesh.data=1 mesh.context=4
XLA_FLAGS='' moe train "${common[@]}" --run-dir runs/long-context/context1
XLA_FLAGS='' moe eval "runs/long-context/context4/checkpoints/$steps" --passkey --lengths 8176 \
  --depths 0 0.5 1 --trials 2 --out experiments/long-context/passkey-context4 --no-progress
