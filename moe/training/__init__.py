"""Training: the step (step.py), the objectives (objectives.py: LM and chat SFT; dpo.py),
the fused loss (loss.py), what trains and what stays frozen (trainable.py), where the train
state lives on the mesh (state.py), the initial weights (init_from.py), metrics
(metrics.py) and `moe train`'s loop (loop.py)."""
