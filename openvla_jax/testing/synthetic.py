"""Synthetic training rows with OpenVLA's layout, for benchmarks and multi-process tests.

Each row: BOS, random prompt ids, `action_dim` action tokens (ids 31744..31999), EOS (2); labels are
-100 except the action tokens and the EOS, as the RLDS pipeline makes them.
"""

from __future__ import annotations

import numpy as np


def synthetic_batch(batch: int, length: int, image_size: int, seed: int = 0, action_dim: int = 7) -> dict:
    """-> pixel_values `[B, S, S, 6]` float32 (standard normal), input_ids / labels `[B, L]` int32,
    attention_mask `[B, L]` bool (all real tokens)."""
    if length < action_dim + 3:
        raise ValueError(f"length {length} leaves no prompt before {action_dim} action tokens + EOS")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 31000, (batch, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, -action_dim - 1 : -1] = rng.integers(31744, 32000, (batch, action_dim))
    ids[:, -1] = 2
    labels = np.full((batch, length), -100, np.int32)
    labels[:, -action_dim - 1 :] = ids[:, -action_dim - 1 :]
    return dict(
        pixel_values=rng.normal(size=(batch, image_size, image_size, 6)).astype(np.float32),
        input_ids=ids,
        attention_mask=np.ones((batch, length), bool),
        labels=labels,
    )
