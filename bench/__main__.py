"""`python -m bench [flags]`, from the repo root: the benchmark (see bench/run.py)."""

from bench.run import main

main()
