"""Global batches from per-host data: each process feeds its own rows, JAX stitches the global array.

Every array leaf is split on dim 0 over ("data", "fsdp"); the host's rows are its slice of the global
batch (`global rows = host rows x process_count`). Strings never go to devices: `dataset_name` [B]
becomes int32 `dataset_index` [B] by position in a given list of names (the per-dataset metrics).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from openvla_jax.parallel.sharding import batch_sharding


def dataset_indices(names: np.ndarray, dataset_names: Sequence[str]) -> np.ndarray:
    """str [B] -> int32 [B], the position of each name in `dataset_names`."""
    lookup = {n: i for i, n in enumerate(dataset_names)}
    out = np.empty(len(names), np.int32)
    for i, n in enumerate(np.asarray(names).astype(str)):
        if n not in lookup:
            raise ValueError(f"batch has dataset_name {n!r}, which is not in the dataset list {list(dataset_names)}")
        out[i] = lookup[n]
    return out


def global_batch(
    host_batch: Mapping[str, np.ndarray], mesh: Mesh, dataset_names: Optional[Sequence[str]] = None
) -> dict:
    """dict of NumPy `[B_host, ...]` -> dict of global `jax.Array` `[B_host * processes, ...]`.

    `dataset_name` (strings) is dropped, replaced by `dataset_index` when `dataset_names` is given.
    Other string / object arrays are dropped too (they cannot live on devices)."""
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        if key == "dataset_name":
            if dataset_names is not None:
                out["dataset_index"] = dataset_indices(value, dataset_names)
            continue
        if value.dtype.kind in "USO":
            continue
        if value.ndim == 0:
            raise ValueError(f"batch field {key!r} is a scalar; every field needs a leading batch dim")
        out[key] = value
    rows = {k: v.shape[0] for k, v in out.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"batch fields disagree on the batch size: {rows}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n = next(iter(rows.values()), 0) * jax.process_count()
    if n % shards:
        raise ValueError(
            f"global batch of {n} rows ({n // jax.process_count()} per host x "
            f"{jax.process_count()} hosts) is not divisible by data x fsdp = {shards} devices"
        )
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in out.items()}
