"""Reports of a run: the terminal summary and the JSON report. They format; they never recompute."""
