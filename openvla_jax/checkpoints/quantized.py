"""Save / load a quantized params tree: one safetensors file with flattened names + JSON side files.

Layout of a quantized directory (written under a temp name and renamed, so it is all or nothing):
  quantized.safetensors  every leaf by its flax path joined with "/"; a QTensor as `<path>/q`
                         (int8) and `<path>/scale` (float32)
  quant_config.json      format tag, mode, group_size and each QTensor's static metadata
  model_config.json      the model config (`models/config.py` VLAConfig.to_dict())
  dataset_statistics.json norm_stats (when known); tokenizer files (when given)
`OpenVLA.load` recognises the directory by `quant_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from flax import linen as nn

from openvla_jax.convert.hf import copy_tokenizer
from openvla_jax.convert.io import open_state_dict, save_state_dict
from openvla_jax.convert.mapping import unflatten_params
from openvla_jax.models.config import VLAConfig, read_model_config, write_model_config
from openvla_jax.quant.weights import QTensor, is_qtensor, quant_mode
from openvla_jax.utils.files import atomic_output, read_json

FORMAT = "openvla_jax-quantized-v1"
CONFIG_NAME = "quant_config.json"
WEIGHTS_NAME = "quantized.safetensors"


def is_quantized_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()


def _flatten(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        path = (*prefix, str(k))
        if isinstance(v, dict):
            out.update(_flatten(v, path))
        else:
            out["/".join(path)] = v
    return out


def save_quantized(
    out_dir,
    qparams,
    model_config: VLAConfig,
    norm_stats: Optional[dict] = None,
    tokenizer_dir=None,
    group_size: Optional[int] = None,
) -> Path:
    """Write `qparams` (from `quantize_params`) with its model config. Refuses a non-empty
    `out_dir` and a tree without QTensors (save a float tree with `scripts/convert.py`)."""
    qparams = nn.meta.unbox(qparams)
    mode = quant_mode(qparams)
    if mode is None:
        raise ValueError("save_quantized got a params tree without quantized kernels; quantize_params it first")
    tensors, leaves = {}, {}
    for key, v in _flatten(qparams).items():
        if is_qtensor(v):
            tensors[f"{key}/q"] = np.asarray(v.q)
            tensors[f"{key}/scale"] = np.asarray(v.scale)
            leaves[key] = v.metadata()
        else:
            tensors[key] = np.asarray(v)
    config = dict(format=FORMAT, mode=mode, group_size=group_size, quantized=leaves)
    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        save_state_dict(tmp / WEIGHTS_NAME, tensors, {"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        write_model_config(tmp / "model_config.json", model_config)
        if norm_stats is not None:
            (tmp / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2) + "\n")
        copy_tokenizer(tokenizer_dir, tmp)
    return out_dir


def load_quantized(path):
    """-> `(model_config, qparams, extras)` (like `checkpoints.converted.load_converted`); extras: norm_stats,
    mode, group_size. QTensor arrays come back as NumPy int8 / float32."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{path} is not a quantized checkpoint: no {CONFIG_NAME} (write one with save_quantized)"
        )
    config = read_json(cfg_path, "quantization config")
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r}, expected {FORMAT!r}")
    reader = open_state_dict(path / WEIGHTS_NAME, allow_nonfloat=True)  # int8 / packed int4 codes
    keys = set(reader)
    quantized = config["quantized"]
    flat = {}
    for key, meta in quantized.items():
        missing = [f"{key}/{s}" for s in ("q", "scale") if f"{key}/{s}" not in keys]
        if missing:
            raise ValueError(f"{path / WEIGHTS_NAME} lacks {missing}, which {CONFIG_NAME} lists")
        qt = QTensor(
            reader[f"{key}/q"],
            reader[f"{key}/scale"],
            int(meta["bits"]),
            tuple(meta["shape"]),
            int(meta["lead"]),
            int(meta["in_dims"]),
            int(meta["groups"]),
        )
        if qt.scale.shape != tuple(qt.grouped_shape[:-2]) + qt.grouped_shape[-1:]:
            raise ValueError(
                f"{key}/scale has shape {qt.scale.shape}, expected {qt.grouped_shape[:-2] + qt.grouped_shape[-1:]}"
            )
        flat[key] = qt
        keys -= {f"{key}/q", f"{key}/scale"}
    for key in keys:
        flat[key] = reader[key]
    tree = unflatten_params((key.split("/"), v) for key, v in flat.items())
    model_config = read_model_config(path / "model_config.json")
    stats = path / "dataset_statistics.json"
    extras = dict(
        norm_stats=read_json(stats, "dataset statistics") if stats.exists() else None,
        mode=config["mode"],
        group_size=config.get("group_size"),
    )
    return model_config, tree, extras
