"""How the work is spread over devices: the mesh from config and the logical-axis rules
presets (mesh.py), the expert-parallel exchange of token copies (expert_parallel.py) and
the collectives it uses (collectives.py). Nothing here imports the model or training."""
