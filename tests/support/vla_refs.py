"""A tiny OpenVLA in PyTorch, assembled as the original `OpenVLAForActionPrediction` is: two timm
towers (second-to-last block, no norm, prefix dropped), an fc1/GELU/fc2/GELU/fc3 projector and a
transformers `LlamaForCausalLM`; input embeddings `[emb(BOS), projected patches, emb(tokens[1:])]`.
Every tensor is random (norms, LayerScale, tokens included) so a mix-up anywhere shows."""

import json
from pathlib import Path

import numpy as np

from openvla_jax.convert.hf_config import hf_config_from_model_config
from openvla_jax.testing import torch_reference
from openvla_jax.testing.torch_reference import hf_state_dict
from tests.support.helpers import torch
from tests.support.vision_refs import TINY

NORM_STATS = {
    "bridge_orig": {
        "action": {
            "mean": [0.1] * 7,
            "std": [0.5] * 7,
            "max": [1.0] * 7,
            "min": [-1.0] * 7,
            "q01": [-0.9] * 7,
            "q99": [0.9] * 6 + [1.0],
            "mask": [True] * 6 + [False],
        },
        "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": 100,
        "num_trajectories": 3,
    }
}


def build_torch_vla(config=TINY, seed=0):
    """-> torch module with the HF OpenVLA submodule names and `forward(pixel_values, ids, mask)`."""
    torch()
    return torch_reference.build_torch_vla(config, seed)


def write_hf_dir(model, path: Path, config=TINY, norm_stats=NORM_STATS) -> dict:
    """An OpenVLA HF directory: `model.safetensors` (fp32, original key names) + config.json."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_from_model_config(config, norm_stats, "float32"), indent=2))
    return {k: v.numpy() for k, v in sd.items()}


def torch_logits(model, pixel_values, ids, mask) -> np.ndarray:
    t = torch()
    with t.no_grad():
        return model(t.tensor(pixel_values), t.tensor(ids, dtype=t.long), t.tensor(mask, dtype=t.long)).numpy()


def torch_greedy(model, pixel_values, ids, lengths, num_tokens=7) -> np.ndarray:
    """Greedy ids `[B, num_tokens]`: each row alone, unpadded, full forward per step (no cache)."""
    t = torch()
    out = []
    with t.no_grad():
        for i, n in enumerate(lengths):
            row = t.tensor(ids[i : i + 1, :n], dtype=t.long)
            pv = t.tensor(pixel_values[i : i + 1])
            got = []
            for _ in range(num_tokens):
                nxt = model(pv, row, t.ones_like(row))[:, -1].argmax(-1)
                got.append(int(nxt))
                row = t.cat([row, nxt[:, None]], dim=1)
            out.append(got)
    return np.array(out, np.int32)


def inputs(b=2, t=10, seed=0, vocab=32064):
    """NCHW pixel values, BOS-first right-padded ids, mask, lengths."""
    rng = np.random.default_rng(seed)
    pv = rng.standard_normal((b, 6, 224, 224)).astype(np.float32)
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
    ids[:, 0] = 1
    lengths = np.array([t, t - 3, t - 5, t - 1][:b])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 32000)
    return pv, ids, mask, lengths


def valid_positions(x, lengths, num_patches=256):
    """Concatenate each row's real (non-padding) positions of `[B, T + P, ...]`."""
    return np.concatenate([x[i, : n + num_patches] for i, n in enumerate(lengths)])
