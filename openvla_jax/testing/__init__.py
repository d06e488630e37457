"""What tests and benchmarks share: PyTorch reference models built from our configs, the shims that
let CPU torch import timm, synthetic batches. PyTorch is a test dependency: only this package imports it."""
