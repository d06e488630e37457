"""Shared test utilities: PyTorch references and comparisons."""

import numpy as np

from openvla_jax.testing.torch_compat import import_torch


def torch():
    """torch, importable together with timm/transformers (see openvla_jax.testing.torch_compat)."""
    return import_torch(2)


def timm():
    torch()
    import timm as _timm

    return _timm


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def random_params(module, seed: int = 0) -> dict:
    """Random fp32 NumPy params for a VLA module, fast (shapes from eval_shape, no init compile):
    norm scales near 1, every other leaf N(0, 0.05^2)."""
    import jax
    from flax import linen as nn

    from openvla_jax.train.optimizer import param_paths
    from openvla_jax.train.step import abstract_params

    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(abstract_params(module))
    return jax.tree.map(
        lambda s, p: (
            1.0 + 0.1 * rng.normal(size=s.shape) if p.endswith("scale") else 0.05 * rng.normal(size=s.shape)
        ).astype(np.float32),
        shapes,
        param_paths(shapes),
    )
