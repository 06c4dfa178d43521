"""``diffviz sweep``: many runs over a grid of settings (grid.py), recorded by one worker per process
(runner.py) on the local executor (local.py) or Ray actors (ray_executor.py), indexed in ``sweep.json``
(ledger.py; the format is export/sweep.py's)."""
