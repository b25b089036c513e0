"""TPU plans from a CPU host: `moe aot` compiles the train step for a TPU topology and
reports per-chip memory, FLOPs and a roofline step time (aot.py); `moe plan` compiles every
mesh of a topology and ranks them (plan.py)."""
