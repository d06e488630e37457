"""Our converted format: an orbax checkpoint of the VLA params plus JSON side files.

Layout of a converted directory:
  params/                 orbax PyTree checkpoint (NumPy leaves, checkpoint dtype kept)
  model_config.json       the model ConfigDict (configs/model.py layout)
  dataset_statistics.json norm_stats (when known)
  hf_config.json          the source config.json's descriptive fields, reused by to-hf
  tokenizer files         copied when present
  COMPLETE                written last; the directory is built under a temp name and renamed
Memory (NOT streaming yet): `load_hf` builds the whole params tree in host memory (1.2x the
checkpoint) and orbax's save copies it again: measured peak RSS above the interpreter's for the
`small` config (171 MB bf16) is +480 MB for to-jax (2.8x) and +340 MB for to-hf (2x), so openvla-7b
(15.1 GB bf16) would need ~40 GB for to-jax. The HF side (`save_hf`) streams one tensor at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

from openvla_jax.convert.hf import TOKENIZER_FILES, atomic_dir, commit_dir, copy_tokenizer, vla_specs
from openvla_jax.convert.hf_config import OPENVLA_7B_FIELDS
from openvla_jax.convert.mapping import check_flax_params

MARKER = "COMPLETE"


def save_converted(out_dir, model_config: ml_collections.ConfigDict, params, norm_stats: Optional[dict] = None,
                   tokenizer_dir=None, hf_config: Optional[dict] = None) -> Path:
    """Write params (orbax) + model_config.json + dataset_statistics.json + tokenizer files, atomically.

    `hf_config`: the source config.json; its descriptive fields (backbone ids, resize strategy, ...)
    are kept so that to-hf writes them back unchanged."""
    out_dir = Path(out_dir)
    params = nn.meta.unbox(params)
    check_flax_params(vla_specs(model_config, bool(model_config.get("scan_layers", False))), params, "params to save")
    tmp = atomic_dir(out_dir)
    try:
        ocp.PyTreeCheckpointer().save(str((tmp / "params").absolute()), params)
        (tmp / "model_config.json").write_text(model_config.to_json(indent=2, sort_keys=True) + "\n")
        if norm_stats is not None:
            (tmp / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2) + "\n")
        if hf_config is not None:
            kept = {k: hf_config[k] for k in OPENVLA_7B_FIELDS if k in hf_config}
            (tmp / "hf_config.json").write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
        copy_tokenizer(tokenizer_dir, tmp)
        (tmp / MARKER).write_text("ok\n")
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_converted(path) -> bool:
    return (Path(path) / "model_config.json").exists() and (Path(path) / "params").is_dir()


def load_converted(path):
    """-> `(model_config, params, extras)` like `load_hf`: params as NumPy arrays (saved dtype);
    extras: norm_stats, hf_config (descriptive config.json fields), tokenizer_files."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete converted checkpoint (no {MARKER} marker); "
                                "expected the output of `scripts/convert.py to-jax`")
    model_config = ml_collections.ConfigDict(json.loads((path / "model_config.json").read_text()))
    params = ocp.PyTreeCheckpointer().restore(str((path / "params").absolute()))
    stats = path / "dataset_statistics.json"
    hf_config = path / "hf_config.json"
    extras = dict(
        norm_stats=json.loads(stats.read_text()) if stats.exists() else None,
        hf_config=json.loads(hf_config.read_text()) if hf_config.exists() else {},
        tokenizer_files=[str(path / n) for n in TOKENIZER_FILES if (path / n).exists()],
    )
    return model_config, params, extras


def convert_to_jax(hf_dir, out_dir, scanned: bool = False) -> Path:
    """HF OpenVLA directory -> converted directory (params kept in the checkpoint's dtype)."""
    from openvla_jax.convert.hf import load_hf

    model_config, params, extras = load_hf(hf_dir, scanned=scanned)
    tok = Path(hf_dir) if extras["tokenizer_files"] else None
    return save_converted(out_dir, model_config, params, extras["norm_stats"], tok, extras["config_json"])


def convert_to_hf(jax_dir, out_dir, dtype: str = "bfloat16", max_shard_size="5GB") -> Path:
    """Converted directory -> HF OpenVLA directory (`dtype` bfloat16 or float32)."""
    from openvla_jax.convert.hf import save_hf

    model_config, params, extras = load_converted(jax_dir)
    tok = Path(jax_dir) if extras["tokenizer_files"] else None
    return save_hf(out_dir, model_config, params, extras["norm_stats"], tok, dtype, max_shard_size,
                   config_extra=extras["hf_config"])
