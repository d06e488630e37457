"""The benchmark suite (`scripts/bench.py`, `make bench`): JAX against the PyTorch reference, same
config, same machine, one run. Not part of the installed library; results go to BENCHMARKS.md."""
