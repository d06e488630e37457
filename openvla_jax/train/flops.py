"""Model FLOPs of a training step and of predict_action, for MFU; known accelerators' peaks and HBM
bandwidth, for MFU and the bandwidth-bound decoding limit.

Counting dense matmuls only (2 FLOPs per multiply-add; the PaLM / MaxText convention). Forward of
`tokens` through N matmul parameters: 2 x N x tokens, plus attention scores QK^T and AV:
4 x layers x width x S x tokens (S = keys attended). A training step is forward + backward = 3x:
  LLM        6 x N_llm_matmul x tokens          N_llm_matmul: decoder + lm_head weights (not the
                                                embedding table, a lookup)
             + 12 x layers x hidden x S x tokens
  vision     6 x N_vision x patches x images    both towers' patch embedding and the blocks that
                                                run (all but the last) + projector, once per image
             + 12 x sum(depth x width) x patches^2 x images
  lm_head    with logits only at K supervised positions, its 6 x V x hidden term counts K per row.
Frozen parameters still cost forward + input-gradient (4x) but no weight gradient; we count 6x for
every parameter (the usual simplification), so MFU is slightly overstated when parts are frozen.
predict_action (inference, forward only): vision once per image, one prefill of S = T + P tokens with
the lm_head at the last position, then `num_tokens - 1` cached steps of one token each.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from openvla_jax.models.config import as_config


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _model_counts(model_config) -> dict:
    """Matmul parameter counts of the parts that run (no memory: abstract params)."""
    from openvla_jax.models import vit, vla
    from openvla_jax.train.step import abstract_params

    model_config = as_config(model_config)
    module = vla.from_config(model_config)
    p = nn.meta.unbox(abstract_params(module))
    lm = p["language_model"]
    head = _count(lm["lm_head"])
    towers = []
    for key in ("featurizer", "fused_featurizer"):
        tower = getattr(model_config.vision, key)
        if tower is not None:
            t = vit.tower_from_config(tower, model_config.vision.image_size)
            run = t.depth - 1  # OpenVLA takes the second-to-last block's output: the last never runs
            tp = p["vision_backbone"][key]
            blocks = (
                _count(tp["blocks"]) * run // t.depth
                if "blocks" in tp  # scanned: [depth, ...]
                else sum(_count(tp[f"blocks_{i}"]) for i in range(run))
            )
            towers.append(dict(params=blocks + _count(tp["patch_embed"]), run=run, width=t.embed_dim))
    return dict(
        decoder=_count(lm) - _count(lm["embed_tokens"]) - head,
        head=head,
        projector=_count(p["projector"]),
        towers=towers,
        patches=module.num_patches,
        total=_count(p),
    )


def _vision_forward(c: dict) -> float:
    """Forward FLOPs of both towers + projector for one image."""
    n = c["patches"]
    f = 2 * c["projector"] * n
    for t in c["towers"]:
        f += 2 * t["params"] * n + 4 * t["run"] * t["width"] * n * n
    return float(f)


def step_flops(model_config, batch: int, seq_len: int, supervised_tokens: int | None = None) -> float:
    """Training FLOPs of one step on `batch` rows of `seq_len` text tokens (+ the image patches)."""
    c = _model_counts(model_config)
    llm_c = model_config.llm
    s = seq_len + c["patches"]
    llm = 6 * c["decoder"] * s + 12 * llm_c.num_hidden_layers * llm_c.hidden_size * s * s
    llm += 6 * c["head"] * (supervised_tokens if supervised_tokens else s)
    return float(batch * (llm + 3 * _vision_forward(c)))


def predict_flops(model_config, batch: int, prompt_len: int, num_tokens: int = 7) -> float:
    """Inference FLOPs of predict_action on `batch` images with `prompt_len`-token prompts: vision,
    prefill of S = prompt_len + patches tokens (lm_head at the last one), `num_tokens - 1` cached steps."""
    c = _model_counts(model_config)
    layers, hidden = model_config.llm.num_hidden_layers, model_config.llm.hidden_size
    s = prompt_len + c["patches"]
    prefill = 2 * c["decoder"] * s + 4 * layers * hidden * s * s + 2 * c["head"]
    steps = sum(2 * c["decoder"] + 2 * c["head"] + 4 * layers * hidden * (s + i) for i in range(1, num_tokens))
    return float(batch * (_vision_forward(c) + prefill + steps))


# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets, without sparsity).
# Keys are matched as substrings of the device kind the runtime reports, first match wins: v5e
# reports "TPU v5 lite", v5p plain "TPU v5" (so "TPU v5 lite" must come first), v6e "TPU v6 lite".
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,
    "TPU7x": 1153e12,  # per device: a TPU7x chip (2307 TFLOP/s) is two devices
}

# HBM bandwidth in bytes/s (datasheets): batch-1 decoding reads every weight once per token.
HBM_BANDWIDTH = {
    "H100": 3.35e12,
    "H200": 4.8e12,
    "B200": 7.7e12,
    "A100": 2.0e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.82e12,
    "TPU v5": 2.76e12,  # v5p
    "TPU v6 lite": 1.64e12,
    "TPU7x": 3.69e12,  # per device (7.37 TB/s a chip of two)
}


def _lookup(table: dict, device_kind: str):
    for name, value in table.items():
        if name.lower() in device_kind.lower():
            return value
    return None


def peak_flops(device_kind: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` if given, else from the device kind, else None (CPU)."""
    if override:
        return float(override)
    return _lookup(PEAK_FLOPS, device_kind)


def hbm_bandwidth(device_kind: str) -> float | None:
    """HBM bytes/s of one known accelerator, else None (CPU, unknown)."""
    return _lookup(HBM_BANDWIDTH, device_kind)


def bandwidth_bound_rate(weight_bytes: float, device_kind: str, num_tokens: int = 7) -> float | None:
    """Upper bound on batch-1 predict_action calls/s when every generated token must read all weights
    once (prefill + `num_tokens - 1` steps = `num_tokens` reads): bandwidth / (num_tokens x bytes).
    7B bf16 on an H200: 15.1 GB / 4.8 TB/s = 3.1 ms per token, ~22 ms per action, ~45 actions/s."""
    bw = hbm_bandwidth(device_kind)
    return None if bw is None else bw / (num_tokens * weight_bytes)
