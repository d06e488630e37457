"""Training: loss and metrics, optimizer, train state, the jitted step. (Heavy imports stay in the
submodules: `from openvla_jax.train import step` when you need it.)"""
