"""OpenVLA HF checkpoint directory <-> (model config, Flax params of `openvla_jax.models.vla.VLA`).

Reading is lazy (one tensor at a time from single or sharded safetensors, original HF or Prismatic
key names); writing streams one tensor at a time into shards `model-0000i-of-0000N.safetensors` with
`model.safetensors.index.json`, built in a temp directory renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional

import flax.linen as nn
import ml_dtypes
import numpy as np

from openvla_jax.convert import processor
from openvla_jax.convert.hf_config import generation_config, hf_config_from_model_config, model_config_from_hf
from openvla_jax.convert.io import INDEX_NAME, open_state_dict, write_safetensors
from openvla_jax.convert.llama import llama_specs
from openvla_jax.convert.mapping import ParamSpec, hf_getter, iter_hf_to_flax, unflatten_params
from openvla_jax.convert.vision import prismatic_to_hf, vision_specs
from openvla_jax.models.config import VLAConfig, as_config
from openvla_jax.utils.files import atomic_output, read_json

__all__ = [
    "model_config_from_hf",
    "hf_config_from_model_config",
    "vla_specs",
    "load_hf",
    "save_hf",
    "TOKENIZER_FILES",
    "parse_size",
    "copy_source_files",
]

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# A source HF directory's files that an export never carries: weights and their indexes (the export
# writes the model's own) and dataset statistics (the export's come from the model's norm_stats).
NOT_CARRIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".index.json")
NOT_CARRIED_NAMES = ("dataset_statistics.json",)


def vla_specs(model_config: VLAConfig, scanned: bool) -> list[ParamSpec]:
    """Every tensor of an OpenVLA HF checkpoint: vision backbone + projector, then the Llama under
    `language_model.` (Flax paths under `language_model/`)."""
    config = as_config(model_config)
    llm = [
        dataclasses.replace(s, path=("language_model",) + s.path)
        for s in llama_specs(config.llm, scanned, prefix="language_model.")
    ]
    return vision_specs(config, scanned) + llm + oft_specs(config)


def oft_specs(model_config: VLAConfig) -> list[ParamSpec]:
    """The OFT modules' tensors (`models/action_heads.py`), named as PyTorch modules would be
    (`proprio_projector.fc1.weight`, `action_head.fc_in.weight`, LayerNorm scale = `.weight`). Only
    converted checkpoints hold them: the OpenVLA HF format has no place for them (`save_hf` refuses)."""
    config = as_config(model_config)
    opts = config.actions
    d = config.llm.hidden_size
    layers = []  # (module, name, in, out) for Dense; (module, name, dim, None) for LayerNorm
    if opts.proprio_dim:
        layers += [("proprio_projector", "fc1", opts.proprio_dim, d), ("proprio_projector", "fc2", d, d)]
    if opts.action_head == "l1":
        a = opts.action_dim
        layers += [("action_head", "norm_in", a * d, None), ("action_head", "fc_in", a * d, d)]
        for i in range(2):
            layers += [("action_head", f"block{i}_norm", d, None), ("action_head", f"block{i}_fc", d, d)]
        layers += [("action_head", "norm_out", d, None), ("action_head", "fc_out", d, a)]
    specs = []
    for module, name, n_in, n_out in layers:
        key = f"{module}.{name}"
        if n_out is None:
            specs += [
                ParamSpec(f"{key}.weight", (module, name, "scale"), (n_in,), (n_in,)),
                ParamSpec(f"{key}.bias", (module, name, "bias"), (n_in,), (n_in,)),
            ]
        else:
            specs += [
                ParamSpec(f"{key}.weight", (module, name, "kernel"), (n_out, n_in), (n_in, n_out), "linear"),
                ParamSpec(f"{key}.bias", (module, name, "bias"), (n_out,), (n_out,)),
            ]
    return specs


class _Renamed(Mapping):
    """Lazy view of a reader under new key names (`new -> old`)."""

    def __init__(self, reader, new_to_old: dict):
        self.reader, self.new_to_old = reader, new_to_old
        self.shapes = {new: reader.shapes[old] for new, old in new_to_old.items()}

    def __getitem__(self, key):
        return self.reader[self.new_to_old[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.new_to_old)

    def __len__(self):
        return len(self.new_to_old)


def _is_prismatic(keys) -> bool:
    return any(k.startswith(("llm.", "dino_featurizer.", "siglip_featurizer.", "projector.0.")) for k in keys)


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json; expected an OpenVLA HF checkpoint directory")
    return read_json(path, "HF config")


def open_hf(hf_dir, scanned: bool = False, dtype=None):
    """Open an OpenVLA HF directory lazily -> `(model_config, leaves, extras)`.

    `leaves` yields `(flax path, NumPy array)` one array at a time (checkpoint dtype, or `dtype`),
    laid out for `vla.from_config(model_config)` (`scan_layers=scanned`); keys and shapes are checked
    before the first array is read (StateDictError lists missing / unexpected / misshapen keys).
    extras: `norm_stats` (config.json's, else `dataset_statistics.json`'s), `config_json` (the raw
    dict) and `tokenizer_files` (paths present)."""
    hf_dir = Path(hf_dir)
    config_json = read_config(hf_dir)
    model_config = model_config_from_hf(config_json).replace(scan_layers=bool(scanned))
    reader = open_state_dict(hf_dir)
    state = reader
    if _is_prismatic(reader):
        state = _Renamed(
            reader,
            prismatic_to_hf({k: k for k in reader}, fused=model_config.vision.fused_featurizer is not None),
        )
    leaves = iter_hf_to_flax(
        vla_specs(model_config, scanned),
        state,
        str(hf_dir),
        shapes=state.shapes,
        dtype=None if dtype is None else np.dtype(dtype),
    )
    leaves = _checked_first(leaves)
    norm_stats = config_json.get("norm_stats")
    if norm_stats is None and (hf_dir / "dataset_statistics.json").exists():
        norm_stats = read_json(hf_dir / "dataset_statistics.json", "dataset statistics")
    extras = dict(
        norm_stats=norm_stats,
        config_json=config_json,
        tokenizer_files=[str(hf_dir / n) for n in TOKENIZER_FILES if (hf_dir / n).exists()],
    )
    return model_config, leaves, extras


def _checked_first(gen):
    """Run a generator up to its first item now (its checks raise here, not at first use)."""
    try:
        first = next(gen)
    except StopIteration:
        return iter(())

    def chain():
        yield first
        yield from gen

    return chain()


def load_hf(hf_dir, scanned: bool = False, dtype=None):
    """Read an OpenVLA HF directory -> `(model_config, params, extras)`, params as a nested dict of
    NumPy arrays (see `open_hf`)."""
    model_config, leaves, extras = open_hf(hf_dir, scanned, dtype)
    return model_config, unflatten_params(leaves), extras


def parse_size(size) -> int:
    """`"5GB"` -> 5e9 bytes (HF convention: GB = 1e9, GiB = 2**30); ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max shard size {size!r}: expected e.g. '5GB', '500MB', '2GiB' or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _shards(entries, max_bytes: int) -> list[list]:
    """Split (key, shape, dtype) entries in order; a tensor larger than the limit gets its own shard."""
    shards, current, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    if current:
        shards.append(current)
    return shards


def write_shards(out_dir: Path, entries, get, max_shard_size="5GB") -> int:
    """Stream `(key, shape, dtype)` entries (values from `get(key)`, one at a time) into
    `model-0000i-of-0000N.safetensors` shards of at most `max_shard_size` plus the HF index json;
    returns the total bytes."""
    shards = _shards(entries, parse_size(max_shard_size))
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(Path(out_dir) / name, group, get, {"format": "pt"})
        for key, shape, dt in group:
            weight_map[key] = name
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total


def copy_tokenizer(tokenizer_dir, out_dir: Path) -> list[str]:
    copied = []
    if tokenizer_dir is None:
        return copied
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied


def copy_source_files(source_dir, out_dir: Path) -> list[str]:
    """Carry into `out_dir` the files of the HF directory a model was converted from that an export
    does not write itself (remote code `*.py`, README, ...): top-level regular files (symlinks
    followed, as in a hub cache snapshot), no hidden ones, never weights or dataset statistics
    (`NOT_CARRIED_*`) and never a name `out_dir` already holds. -> the names copied."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source HF directory {source_dir} does not exist (its extra files cannot be copied)")
    copied = []
    for src in sorted(source_dir.iterdir()):
        name = src.name
        if (
            not src.is_file()
            or name.startswith(".")
            or name.endswith(NOT_CARRIED_SUFFIXES)
            or name in NOT_CARRIED_NAMES
            or (out_dir / name).exists()
        ):
            continue
        shutil.copyfile(src, out_dir / name)
        copied.append(name)
    return copied


def save_hf(
    out_dir,
    model_config: VLAConfig,
    params,
    norm_stats: Optional[dict] = None,
    tokenizer_dir=None,
    dtype: str = "bfloat16",
    max_shard_size="5GB",
    config_extra: Optional[dict] = None,
    source_dir=None,
) -> Path:
    """Write an OpenVLA HF directory the original PyTorch code loads with `AutoModelForVision2Seq`
    and `AutoProcessor` (trust_remote_code): sharded safetensors + index, config.json,
    generation_config.json, preprocessor_config.json + processor_config.json (`convert/processor.py`),
    dataset_statistics.json (when `norm_stats`), the tokenizer files of `tokenizer_dir` that exist,
    then the other files of `source_dir` (the HF directory the model came from: remote code, README;
    `copy_source_files`), which never replace a file written here. One tensor in memory at a time
    (plus `params`). Written into a temp directory renamed to `out_dir` at the end: an interrupted
    save leaves none."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    oft = as_config(model_config).actions.differences_from_openvla()
    if oft:
        raise ValueError(
            f"the OpenVLA HF format has no place for the OFT options {oft} (model config); "
            "keep this model as a converted (to-jax) checkpoint"
        )
    out_dir = Path(out_dir)
    np_dtype = DTYPES[dtype]
    params = nn.meta.unbox(params)
    scanned = "layers" in params.get("language_model", {})
    specs = vla_specs(model_config, scanned)
    get_hf = hf_getter(specs, params, "params to save")

    def get(key):
        return get_hf(key).astype(np_dtype, copy=False)

    # Every small file is made (and checked) before the first shard is written.
    config = hf_config_from_model_config(model_config, norm_stats, dtype, config_extra)
    files = {
        "config.json": config,
        "generation_config.json": generation_config(),
        processor.PREPROCESSOR_CONFIG: processor.image_processor_config(
            model_config, config.get("image_resize_strategy", "resize-naive")
        ),
        processor.PROCESSOR_CONFIG: processor.processor_config(),
    }
    if norm_stats is not None:
        files["dataset_statistics.json"] = norm_stats
    if source_dir is not None and not Path(source_dir).is_dir():
        raise FileNotFoundError(f"source HF directory {source_dir} does not exist (its extra files cannot be copied)")
    with atomic_output(out_dir) as tmp:
        write_shards(tmp, [(s.hf_key, s.hf_shape, np_dtype) for s in specs], get, max_shard_size)
        for name, value in files.items():
            (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
        copy_tokenizer(tokenizer_dir, tmp)
        if source_dir is not None:
            copy_source_files(source_dir, tmp)
    return out_dir
