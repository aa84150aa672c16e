"""Benchmarks (not installed with the package): run them as modules from the repository root, e.g.
`python -m bench.train_step`, `python -m bench.grounding`."""
