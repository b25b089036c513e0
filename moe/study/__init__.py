"""Studies: sweep specs and their runs (sweep.py), `moe report` (report.py), `moe plot`
(plot.py) and routing analysis of a trained model (routing.py, routing_plots.py)."""
