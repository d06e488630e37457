"""Our converted format: an orbax checkpoint of the VLA params plus JSON side files.

Layout of a converted directory:
  params/                 orbax checkpoint of the params tree (checkpoint dtype kept), written by
                          orbax's partial saves (`orbax.checkpoint.experimental.v1.partial`), one
                          chunk of arrays per save, then finalized; the tree lives in its one
                          subdirectory (`params/state`), a standard orbax PyTree checkpoint
  model_config.json       the model config (`models/config.py` VLAConfig.to_dict())
  dataset_statistics.json norm_stats (when known)
  hf_config.json          the source config.json's descriptive fields, reused by to-hf
  source.json             `{"hf_dir": absolute path}`: the HF directory `to-jax` read, whose other
                          files (remote code, README) `to-hf` carries into its export
  tokenizer files         copied when present
  COMPLETE                written last; the directory is built under a temp name and renamed
Memory: streaming. `to-jax` reads one tensor at a time (plain reads, no mmap), and hands orbax
chunks of at most `chunk_bytes` (default 256 MiB); stacked (`--scanned`) layouts hold one stacked
array at a time. Peak host memory is therefore a small multiple of max(largest tensor, chunk), not
of the model: see BENCHMARKS.md for the measured 7B conversion. `to-hf` streams the HF side one
tensor at a time but restores the params tree whole (one copy of the model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from openvla_jax.convert.hf import TOKENIZER_FILES, copy_tokenizer, vla_specs
from openvla_jax.convert.hf_config import OPENVLA_7B_FIELDS
from openvla_jax.convert.mapping import check_flax_params, flatten_params, unflatten_params
from openvla_jax.models.config import VLAConfig, as_config, read_model_config, write_model_config
from openvla_jax.utils.files import atomic_output, read_json

MARKER = "COMPLETE"
SOURCE_FILE = "source.json"


CHUNK_BYTES = 256 * 2**20


def save_converted(
    out_dir,
    model_config: VLAConfig,
    params,
    norm_stats: Optional[dict] = None,
    tokenizer_dir=None,
    hf_config: Optional[dict] = None,
    chunk_bytes: int = CHUNK_BYTES,
    source_hf_dir=None,
) -> Path:
    """Write params (orbax) + model_config.json + dataset_statistics.json + tokenizer files, atomically.

    `params`: the nested params tree (NumPy or jax arrays, boxed or not). `hf_config`: the source
    config.json; its descriptive fields (backbone ids, resize strategy, ...) are kept so that to-hf
    writes them back unchanged. `source_hf_dir`: the HF directory the model came from, recorded
    (absolute) in `source.json` so that to-hf carries its other files (remote code, README)."""
    params = nn.meta.unbox(params)
    specs = vla_specs(model_config, as_config(model_config).scan_layers)
    check_flax_params(specs, params, "params to save")
    leaves = ((path, np.asarray(jax.device_get(v))) for path, v in flatten_params(params).items())
    return save_converted_stream(
        out_dir, model_config, leaves, norm_stats, tokenizer_dir, hf_config, chunk_bytes, source_hf_dir
    )


def save_converted_stream(
    out_dir,
    model_config: VLAConfig,
    leaves: Iterable[tuple[tuple[str, ...], np.ndarray]],
    norm_stats: Optional[dict] = None,
    tokenizer_dir=None,
    hf_config: Optional[dict] = None,
    chunk_bytes: int = CHUNK_BYTES,
    source_hf_dir=None,
) -> Path:
    """`save_converted` from an iterator of `(flax path, array)`: arrays are handed to orbax in
    chunks of at most `chunk_bytes` (one array larger than that is a chunk alone) and dropped, so
    the whole tree is never in memory. The caller checks the leaves against the model's specs."""
    out_dir = Path(out_dir)
    with atomic_output(out_dir) as tmp:
        _write_params(tmp / "params", leaves, chunk_bytes)
        write_model_config(tmp / "model_config.json", model_config)
        if norm_stats is not None:
            (tmp / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2) + "\n")
        if hf_config is not None:
            kept = {k: hf_config[k] for k in OPENVLA_7B_FIELDS if k in hf_config}
            (tmp / "hf_config.json").write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
        if source_hf_dir is not None:
            source = {"hf_dir": str(Path(source_hf_dir).absolute())}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        copy_tokenizer(tokenizer_dir, tmp)
        (tmp / MARKER).write_text("ok\n")
    return out_dir


def _write_params(params_dir: Path, leaves, chunk_bytes: int) -> None:
    from orbax.checkpoint.experimental.v1 import partial

    target = str(params_dir.absolute())
    chunk, size, saved = [], 0, 0

    def flush():
        nonlocal chunk, size, saved
        if chunk:
            partial.save(target, unflatten_params(chunk))
            saved += len(chunk)
        chunk, size = [], 0

    for path, value in leaves:
        chunk.append((path, value))
        size += value.nbytes
        if size >= chunk_bytes:
            flush()
    flush()
    if not saved:
        raise ValueError("no parameters to save")
    partial.finalize(target)


def params_tree_dir(params_dir: Path) -> Path:
    """The orbax PyTree directory inside `params/` (the one subdirectory holding `_METADATA`)."""
    found = sorted(p for p in Path(params_dir).iterdir() if (p / "_METADATA").exists())
    if len(found) != 1:
        raise FileNotFoundError(
            f"{params_dir}: expected one orbax PyTree directory (with _METADATA), found {[p.name for p in found]}"
        )
    return found[0]


def is_converted(path) -> bool:
    return (Path(path) / "model_config.json").exists() and (Path(path) / "params").is_dir()


def load_converted(path):
    """-> `(model_config, params, extras)` like `load_hf`: params as NumPy arrays (saved dtype);
    extras: norm_stats, hf_config (descriptive config.json fields), tokenizer_files, source_hf_dir
    (the HF directory `to-jax` read, or None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; expected a converted checkpoint directory (`scripts/convert.py "
            "to-jax`, or a training run's export: `make demo` writes runs/demo/export)"
        )
    if not (path / MARKER).exists():
        raise FileNotFoundError(
            f"{path} is not a complete converted checkpoint (no {MARKER} marker); "
            "expected the output of `scripts/convert.py to-jax`"
        )
    model_config = read_model_config(path / "model_config.json")
    params = ocp.PyTreeCheckpointer().restore(str(params_tree_dir(path / "params").absolute()))
    stats = path / "dataset_statistics.json"
    hf_config = path / "hf_config.json"
    extras = dict(
        source_hf_dir=read_source_hf_dir(path),
        norm_stats=read_json(stats, "dataset statistics") if stats.exists() else None,
        hf_config=read_json(hf_config, "HF config") if hf_config.exists() else {},
        tokenizer_files=[str(path / n) for n in TOKENIZER_FILES if (path / n).exists()],
    )
    return model_config, params, extras


def read_source_hf_dir(path) -> Optional[str]:
    """The HF directory a converted checkpoint was made from (`source.json`), or None."""
    source = Path(path) / SOURCE_FILE
    if not source.exists():
        return None
    recorded = read_json(source, "converted checkpoint source")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("hf_dir"), str):
        raise ValueError(f'{source}: expected {{"hf_dir": "<path>"}}, got {recorded!r}')
    return recorded["hf_dir"]


def convert_to_jax(hf_dir, out_dir, scanned: bool = False, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """HF OpenVLA directory -> converted directory (params kept in the checkpoint's dtype), streaming
    one tensor at a time (see the module docstring for the memory bound). The HF directory's path is
    recorded (`source.json`) for `convert_to_hf` to carry its other files."""
    from openvla_jax.convert.hf import open_hf

    model_config, leaves, extras = open_hf(hf_dir, scanned=scanned)
    tok = Path(hf_dir) if extras["tokenizer_files"] else None
    return save_converted_stream(
        out_dir, model_config, leaves, extras["norm_stats"], tok, extras["config_json"], chunk_bytes, Path(hf_dir)
    )


def convert_to_hf(jax_dir, out_dir, dtype: str = "bfloat16", max_shard_size="5GB", source_hf_dir=None) -> Path:
    """Converted directory -> HF OpenVLA directory (`dtype` bfloat16 or float32) with the processor
    configs the original's `AutoProcessor` reads, the checkpoint's tokenizer files, and the other files
    (remote code `*.py`, README, ...) of `source_hf_dir`, by default the HF directory `to-jax` recorded
    (skipped with a warning when it no longer exists; a given `source_hf_dir` must exist)."""
    from openvla_jax.convert.hf import save_hf

    model_config, params, extras = load_converted(jax_dir)
    tok = Path(jax_dir) if extras["tokenizer_files"] else None
    if source_hf_dir is None:
        source_hf_dir = read_source_hf_dir(jax_dir)
        if source_hf_dir is not None and not Path(source_hf_dir).is_dir():
            logging.getLogger(__name__).warning(
                "%s: the HF directory it was converted from, %s, no longer exists; the export gets no "
                "remote code or README from it (pass source_hf_dir / --source-hf-dir)",
                jax_dir,
                source_hf_dir,
            )
            source_hf_dir = None
    return save_hf(
        out_dir,
        model_config,
        params,
        extras["norm_stats"],
        tok,
        dtype,
        max_shard_size,
        config_extra=extras["hf_config"],
        source_dir=source_hf_dir,
    )
