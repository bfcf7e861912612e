"""tokentrace's benchmarks: each module measures figures side by side with a baseline
measured in the same run and prints a table (``--json`` for a JSON list instead).
``python -m bench`` runs all five and prints one summary table; results and the exact
commands are in ``docs/benchmarks.md``."""
