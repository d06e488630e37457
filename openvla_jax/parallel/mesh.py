"""The device mesh: axes ("data", "fsdp", "tensor"), sizes from config, -1 = "the rest".

`data` is plain data parallelism (parameters replicated), `fsdp` shards the batch AND the parameters /
optimizer state (ZeRO-3 style), `tensor` splits attention heads, MLP width and the vocabulary.
For multi-slice runs (several TPU slices / GPU hosts joined by a slower data-centre network, DCN) the
`dcn_*` factors say how many slices each axis spans; the axis's total size is ici x dcn, and the
devices are laid out so that only the DCN factor crosses slices.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")

MeshConfig = Any  # ml_collections.ConfigDict, `default_mesh_config()` / `config.mesh` (fields are dynamic)


def default_mesh_config() -> ml_collections.ConfigDict:
    """Pure FSDP over every device by default (what OpenVLA trained with: full sharding)."""
    return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))


def _resolve(sizes: Sequence[int], total: int, what: str, requested) -> list[int]:
    """Replace a single -1 in `sizes` by total / prod(others); check the product equals `total`."""
    sizes = [int(s) for s in sizes]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh{what} sizes must be positive or -1, got {dict(zip(AXES, sizes))} (requested {requested})"
        )
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh{what} size may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(
                f"{total} devices{' per slice' if what else ''} cannot be split into "
                f"{dict(zip(AXES, sizes))}: {total} is not a multiple of {known} "
                f"(requested {requested})"
            )
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total:
        raise ValueError(
            f"mesh{what} shape {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"there are {total} (requested {requested})"
        )
    return sizes


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[list[int], list[int]]:
    """-> (ici sizes, dcn sizes), each [data, fsdp, tensor], with -1 resolved. Total per axis = ici x dcn."""
    requested = {a: cfg.get(a, -1 if a == "fsdp" else 1) for a in AXES}
    dcn = [int(cfg.get(f"dcn_{a}", 1)) for a in AXES]
    requested.update({f"dcn_{a}": d for a, d in zip(AXES, dcn)})
    if any(d < 1 for d in dcn):
        raise ValueError(f"mesh dcn_* sizes must be >= 1 (no -1), got {requested}")
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ValueError(f"{num_devices} devices cannot be split into {slices} slices (requested {requested})")
    ici = _resolve([requested[a] for a in AXES], num_devices // slices, " ICI" if slices > 1 else "", requested)
    return ici, dcn


def make_mesh(cfg: Optional[ml_collections.ConfigDict] = None, devices: Optional[Sequence] = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all of `jax.devices()`)."""
    cfg = default_mesh_config() if cfg is None else cfg
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shape(cfg, len(devices))
    if math.prod(dcn) > 1:
        # Group by slice only when the devices span several (multi-slice TPU); otherwise (GPU hosts,
        # whose devices all report slice 0 or none) each process is one granule.
        by_slice = len({getattr(d, "slice_index", None) for d in devices}) > 1
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(ici)  # CPU / unknown topology: order does not matter
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def single_device_mesh(device=None) -> Mesh:
    """A 1x1x1 mesh (one device): the same code path as a pod, for tests and tiny runs."""
    d = device if device is not None else jax.devices()[0]
    return Mesh(np.asarray([d]).reshape(1, 1, 1), AXES, axis_types=(AxisType.Auto,) * len(AXES))
