"""Development tools (not installed with the package): tiny component checkpoints for tests, the demo and benchmarks.

Run them as modules from the repository root, e.g. `python -m tools.demo_components OUT_DIR`.
"""
