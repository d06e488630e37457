"""Shared test utilities: PyTorch references and comparisons."""

import numpy as np

from openvla_jax.utils.torch_compat import import_torch


def torch():
    """torch, importable together with timm/transformers (see openvla_jax.utils.torch_compat)."""
    return import_torch(2)


def timm():
    torch()
    import timm as _timm

    return _timm


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
