#!/bin/bash
# TPU plans compiled on this CPU host (libtpu), before and after the Pallas kernels:
# attention through XLA or splash, expert matmuls through XLA's ragged_dot or megablox.
#   bash benchmarks/aot/run.sh [CONFIG]  # writes benchmarks/aot/<config>-<topology>-<mesh>-<attention>-<dispatch>.txt
# With CONFIG (e.g. mistral-7b), only that config's plans; with CONFIG-MESH... (e.g.
# mixtral-8x7b-fsdp64-fine), only the plans whose config and mesh name start so.
cd "$(dirname "$0")/../.." || exit 1
export JAX_PLATFORMS=cpu XLA_FLAGS=
only="${1:-}"
plan() {  # config topology mesh-name attention dispatch overrides...
  [[ -n "$only" && "$1" != "$only" && "$1-$3" != "$only"* ]] && return 0
  local out="benchmarks/aot/$1-$2-$3-$4-$5.txt"
  echo "moe aot configs/$1.yaml --topology $2 ${*:6} model.attention=$4 model.moe_dispatch=$5" > "$out"
  moe aot "configs/$1.yaml" --topology "$2" "${@:6}" "model.attention=$4" "model.moe_dispatch=$5" 2>&1 \
    | grep -v -e "TPU_\|InitGoogle\|libtpu_init_utils\|Source Location\|host bounds" >> "$out"
  echo "exit ${PIPESTATUS[0]}" >> "$out"
}
big="train.batch_size=128 train.seq_len=4096"
for kernels in "xla ragged" "splash ragged" "splash megablox"; do
  # shellcheck disable=SC2086
  plan mixtral-8x7b v5p-128 fsdp64 $kernels mesh.fsdp=64 mesh.data=1 $big
  # shellcheck disable=SC2086
  plan mixtral-8x7b v5p-128 fsdp8-expert8-padded $kernels mesh.fsdp=8 mesh.expert=8 mesh.data=1 $big \
    model.ep_exchange=padded
done
# expert parallelism: fixed all_to_all buffers (padded) vs ragged_all_to_all, with receive
# buffers for the worst case and bounded by model.ep_buffer_factor (overflow counted)
ep="mesh.fsdp=8 mesh.expert=8 mesh.data=1 $big"
# shellcheck disable=SC2086
plan mixtral-8x7b v5p-128 fsdp8-expert8-padded-capacity2 splash megablox $ep model.ep_exchange=padded \
  model.capacity_factor=2
# shellcheck disable=SC2086
plan mixtral-8x7b v5p-128 fsdp8-expert8-ragged splash megablox $ep model.ep_exchange=ragged
for factor in 2 1.25; do
  # shellcheck disable=SC2086
  plan mixtral-8x7b v5p-128 "fsdp8-expert8-ragged-buffer$factor" splash megablox $ep model.ep_exchange=ragged \
    "model.ep_buffer_factor=$factor"
done
# the fused lm_head + loss (train.fused_loss, default since 2026-12-03; the plans above were
# compiled before it, with the plain loss or train.loss_chunk's rematerialized blocks)
# shellcheck disable=SC2086
plan mixtral-8x7b v5p-128 fsdp64-fusedloss splash megablox mesh.fsdp=64 mesh.data=1 $big train.fused_loss=true
for attention in xla splash; do
  plan mistral-7b v5p-32 fsdp16 "$attention" auto mesh.fsdp=16 mesh.data=1 train.batch_size=32 train.seq_len=4096
done
# Qwen3-30B-A3B: 128 fine-grained experts, top-8; fsdp alone and with expert parallelism
qwen="train.batch_size=64 train.seq_len=4096"
# shellcheck disable=SC2086
plan qwen3-30b-a3b v5p-64 fsdp32 splash megablox mesh.fsdp=32 mesh.data=1 $qwen
# shellcheck disable=SC2086
plan qwen3-30b-a3b v5p-64 fsdp8-expert4-ragged-buffer2 splash megablox mesh.fsdp=8 mesh.expert=4 mesh.data=1 $qwen \
  model.ep_buffer_factor=2
# the MoE-variants study at 8x7B size (experiments/moe-variants): 32 fine-grained experts of
# d_ff / 4, top-8 (the same active and total parameters), and top-7 beside one shared expert
# shellcheck disable=SC2086
plan mixtral-8x7b v5p-128 fsdp64-fine32-top8 splash megablox mesh.fsdp=64 mesh.data=1 $big \
  model.n_experts=32 model.top_k=8 model.d_ff=3584
# shellcheck disable=SC2086
plan mixtral-8x7b v5p-128 fsdp64-fine32-top7-shared1 splash megablox mesh.fsdp=64 mesh.data=1 $big \
  model.n_experts=32 model.top_k=7 model.d_ff=3584 model.n_shared_experts=1
# long context (docs/context.md): 32 sequences of 32768 tokens, each split over mesh.context
# (attention inside a shard is the blocked XLA attention whatever model.attention says)
long="train.batch_size=32 train.seq_len=32768"
for split in "fsdp32-context2 mesh.fsdp=32 mesh.context=2" "fsdp16-context4 mesh.fsdp=16 mesh.context=4" \
  "fsdp8-context8 mesh.fsdp=8 mesh.context=8"; do
  read -r name meshes <<< "$split"
  # shellcheck disable=SC2086
  plan mixtral-8x7b v5p-128 "long32k-$name" xla megablox mesh.data=1 $meshes $long
done
# shellcheck disable=SC2086
plan mixtral-8x7b v5p-128 long32k-fsdp8-context8-ring xla megablox mesh.data=1 mesh.fsdp=8 mesh.context=8 \
  $long model.context_parallel=ring
# shellcheck disable=SC2086
plan mixtral-8x7b v5p-256 long32k-fsdp32-context4 xla megablox mesh.data=1 mesh.fsdp=32 mesh.context=4 $long
# the 7B dense with its 4096-key window: the halo, as the context size doubles on the same
# chips (twice the sequences per chip) and on twice the chips (the same sequences per chip)
long7b="train.batch_size=8 train.seq_len=32768"
# shellcheck disable=SC2086
plan mistral-7b v5p-32 long32k-fsdp8-context2 xla auto mesh.data=1 mesh.fsdp=8 mesh.context=2 $long7b
# shellcheck disable=SC2086
plan mistral-7b v5p-32 long32k-fsdp4-context4 xla auto mesh.data=1 mesh.fsdp=4 mesh.context=4 $long7b
# shellcheck disable=SC2086
plan mistral-7b v5p-64 long32k-fsdp8-context4 xla auto mesh.data=1 mesh.fsdp=8 mesh.context=4 $long7b
