"""Checkpoints on disk: params (Orbax, written whole or streamed slice by slice,
moe/checkpoint/params.py) and a run's checkpoints with how any checkpoint is located
(moe/checkpoint/runs.py). Local folders or gs:// alike."""
