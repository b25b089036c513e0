"""Weight-only quantization (int8, int4, NF4, NF4 with double quantization) of the params
pytree. The format, `QArray` with `quantize`, is the model's own (moe/model/qarray.py: the
model computes with it); here: which weights and how many bytes (params.py), quantized
checkpoints and `moe quantize`'s streamed writing (store.py), the command (commands.py)."""
