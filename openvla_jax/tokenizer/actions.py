"""Action tokenizer: continuous actions in [-1, 1] <-> the last 256 ids of the Llama vocabulary.

OpenVLA discretises each normalised action dimension into 256 uniform bins and reuses the 256 least
used Llama tokens (ids 31744..31999) for them. Token ids are built directly: the original turned ids
into a string and re-tokenised it, which does not round-trip for some ids (e.g. 31881).
"""

from __future__ import annotations

import numpy as np

from openvla_jax.models.config import as_config


class ActionTokenizer:
    """`encode`: float actions `[..., D]` -> int32 ids `[..., D]`; `decode`: ids -> bin centers.

    bins = linspace(-1, 1, n_bins); d = digitize(clip(a, -1, 1), bins) in 1..n_bins;
    id = vocab_size - d. Decoding maps id -> bin_centers[clip(vocab_size - id - 1, 0, n_bins - 2)].
    """

    def __init__(self, vocab_size: int = 32000, n_bins: int = 256, min_action: float = -1.0, max_action: float = 1.0):
        if vocab_size <= n_bins:
            raise ValueError(f"vocab_size {vocab_size} must exceed n_bins {n_bins}")
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        self.min_action, self.max_action = float(min_action), float(max_action)
        self.bins = np.linspace(min_action, max_action, n_bins)  # float64, as np.linspace gives
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @classmethod
    def for_model(cls, model_config) -> "ActionTokenizer":
        """The action tokens of a `configs/model.py` model: the last `n_action_bins` ids of the base
        vocabulary (the LLM's vocab_size less the padding to a multiple of 64: 32064 -> 32000), whatever
        the text tokenizer's size (the demo's 400-piece tokenizer shares the ids of Llama's)."""
        config = as_config(model_config)
        return cls(vocab_size=config.llm.vocab_size - config.pad_to_multiple_of, n_bins=config.n_action_bins)

    @property
    def first_id(self) -> int:
        """Smallest action id (31744 for Llama): labels above `first_id - 1` are action tokens."""
        return self.vocab_size - self.n_bins

    @property
    def bin_width(self) -> float:
        return float(self.bins[1] - self.bins[0])

    def encode(self, actions) -> np.ndarray:
        """float `[..., D]` -> int32 ids `[..., D]` (NumPy; digitize with right=False)."""
        a = np.clip(np.asarray(actions, np.float64), self.min_action, self.max_action)
        if np.isnan(a).any():
            raise ValueError("ActionTokenizer.encode: action contains NaN")
        d = np.digitize(a, self.bins)  # 1..n_bins
        return (self.vocab_size - d).astype(np.int32)

    def encode_tf(self, actions):
        """TensorFlow twin of `encode` for tf.data maps; float64 compare so bin edges match NumPy."""
        import tensorflow as tf

        a = tf.clip_by_value(tf.cast(actions, tf.float64), self.min_action, self.max_action)
        bins = tf.constant(self.bins, tf.float64)
        flat = tf.reshape(a, [-1])
        # np.digitize(x, bins, right=False) == searchsorted(bins, x, side="right").
        d = tf.searchsorted(bins, flat, side="right", out_type=tf.int32)
        return tf.reshape(self.vocab_size - d, tf.shape(a))

    def decode(self, ids) -> np.ndarray:
        """int ids `[..., D]` -> float32 bin centers `[..., D]`; ids outside the range are clipped."""
        idx = np.clip(self.vocab_size - np.asarray(ids, np.int64) - 1, 0, self.n_bins - 2)
        return self.bin_centers[idx].astype(np.float32)

    def is_action(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.first_id) & (ids < self.vocab_size)
