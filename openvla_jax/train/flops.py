"""Model FLOPs of a training step, for tokens/s -> MFU (the PaLM / MaxText convention).

Per step, counting dense matmuls only (2 FLOPs per multiply-add) and backward = 2 x forward:
  LLM        6 x N_llm_matmul x tokens          N_llm_matmul: decoder + lm_head weights (not the
                                                embedding table, a lookup)
             + 12 x layers x hidden x S x tokens   attention scores QK^T and AV (S = sequence)
  vision     6 x N_vision x patches x images    both towers' patch embedding and the blocks that
                                                run (all but the last) + projector, once per image
             + 12 x sum(depth x width) x patches^2 x images
  lm_head    with logits only at K supervised positions, its 6 x V x hidden term counts K per row.
Frozen parameters still cost forward + input-gradient (4x) but no weight gradient; we count 6x for
every parameter (the usual simplification), so MFU is slightly overstated when parts are frozen.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def step_flops(model_config, batch: int, seq_len: int, supervised_tokens: int | None = None) -> float:
    """Training FLOPs of one step on `batch` rows of `seq_len` text tokens (+ the image patches)."""
    from openvla_jax.models import vit, vla
    from openvla_jax.train.step import abstract_params

    module = vla.from_config(model_config)
    p = nn.meta.unbox(abstract_params(module))
    lm = p["language_model"]
    c = model_config.llm
    head = _count(lm["lm_head"])
    decoder = _count(lm) - _count(lm["embed_tokens"]) - head
    patches = module.num_patches
    s = seq_len + patches
    llm = 6 * decoder * s + 12 * c.num_hidden_layers * c.hidden_size * s * s
    llm += 6 * head * (supervised_tokens if supervised_tokens else s)
    vision = 6 * _count(p["projector"]) * patches
    for key in ("featurizer", "fused_featurizer"):
        tower = model_config.vision.get(key)
        if tower is not None:
            t = vit.tower_from_config(tower, model_config.vision.image_size)
            run = t.depth - 1  # OpenVLA takes the second-to-last block's output: the last never runs
            tp = p["vision_backbone"][key]
            blocks = (_count(tp["blocks"]) * run // t.depth if "blocks" in tp  # scanned: [depth, ...]
                      else sum(_count(tp[f"blocks_{i}"]) for i in range(run)))
            vision += 6 * (blocks + _count(tp["patch_embed"])) * patches
            vision += 12 * run * t.embed_dim * patches * patches
    return float(batch * (llm + vision))


# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` if given, else from the device kind, else None (CPU)."""
    if override:
        return float(override)
    for name, value in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return value
    return None
