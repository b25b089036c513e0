#!/bin/bash
# TPU plans compiled on this CPU host (libtpu): the expert matmuls through XLA's ragged_dot
# and through jax's Pallas megablox kernels, for the README's plans.
#   bash benchmarks/aot/run.sh   # writes benchmarks/aot/<config>-<topology>-<mesh>-<dispatch>.txt
cd "$(dirname "$0")/../.." || exit 1
export JAX_PLATFORMS=cpu XLA_FLAGS=
plan() {  # config topology mesh-name dispatch overrides...
  local out="benchmarks/aot/$1-$2-$3-$4.txt"
  echo "moe aot configs/$1.yaml --topology $2 ${*:5} model.moe_dispatch=$4" > "$out"
  moe aot "configs/$1.yaml" --topology "$2" "${@:5}" "model.moe_dispatch=$4" >> "$out" 2>&1
  echo "exit $?" >> "$out"
}
for dispatch in ragged megablox; do
  plan mixtral-8x7b v5p-128 fsdp64 "$dispatch" mesh.fsdp=64 mesh.data=1 train.batch_size=128 train.seq_len=4096
  plan mixtral-8x7b v5p-128 fsdp8-expert8 "$dispatch" mesh.fsdp=8 mesh.expert=8 mesh.data=1 train.batch_size=128 train.seq_len=4096
done
plan mistral-7b v5p-32 fsdp16 ragged mesh.fsdp=16 mesh.data=1 train.batch_size=32 train.seq_len=4096
