"""Deviceless compile targets: TPU slices and GPU clusters described by name, no hardware attached.

TPU names follow Cloud TPU's accelerator types: `v4-32`, `v5p-128` count TensorCores (two per chip,
one megacore device per chip, so v5p-128 is 64 devices); `v5e-16`, `v6e-64` count chips (one core
each); `tpu7x-8` counts TensorCores (two devices per chip). An explicit chip grid also works:
`v5p:4x4x2`, `v5e:4x8`. `num_slices` > 1 joins that many identical slices over DCN.

GPU clusters are `<gpu>:<hosts>x<gpus per host>` (`h100:4x8`, `a100:1x8`, `h200:2x8`, `b200:1x8`);
`<gpu>:<n>` is one host of n GPUs. The device facts come from `gpu_specs/<gpu>.txtpb`.

`local` is the accelerators this process really has (run with JAX_PLATFORMS=cuda or tpu): the same
compile, plus `aot.run` to execute it and set the prediction beside the measured peak and step time.

Needs the TPU runtime (`libtpu`) or the CUDA plugin (`jax-cuda12-plugin`, `jax-cuda12-pjrt`) installed:
`pip install -e ".[aot]"`. No accelerator, driver or CUDA toolkit is used.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

GiB = 1 << 30
SPECS = Path(__file__).parent / "gpu_specs"

# generation -> (libtpu topology prefix, chip config, grid rank, devices per chip, cores per chip
# counted in the accelerator-type name, HBM bytes per chip)
TPUS = {
    "v4": ("v4", "megacore", 3, 1, 2, 32 * GiB),
    "v5p": ("v5", "megacore", 3, 1, 2, 95 * GiB),
    "v5e": ("v5e", "default", 2, 1, 1, 16 * GiB),
    "v6e": ("v6e", "default", 2, 1, 1, 32 * GiB),
    "tpu7x": ("tpu7x", "default", 3, 2, 2, 192 * GiB),
}
GPUS = ("a100", "h100", "h200", "b200")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given, e.g. "v5p-64" or "h100:4x8"
    platform: str  # "tpu" or "gpu"
    devices: tuple  # compile-only jax devices
    memory_bytes: int  # HBM of one device
    device_kind: str  # as the runtime reports it, e.g. "TPU v5", "NVIDIA H100 80GB HBM3"
    num_slices: int = 1
    topology: str = ""  # the grid given to the runtime

    @property
    def num_devices(self) -> int:
        return len(self.devices)


class TargetUnavailable(RuntimeError):
    """The runtime library for this platform is not installed (the `aot` extra)."""


def grid(chips: int, rank: int) -> tuple[int, ...]:
    """The usual chip grid of a slice: doubling the smallest side, the last one first on ties
    (v5p: 4 chips 2x2x1, 8 2x2x2, 16 2x2x4, 32 2x4x4, 64 4x4x4; v5e: 8 2x4, 16 4x4, 32 4x8)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: slices here are powers of two (give the grid: v5p:4x4x2)")
    dims = [2, 2, 1] if rank == 3 and chips >= 4 else [1] * rank
    while math.prod(dims) < chips:
        i = max(j for j in range(rank) if dims[j] == min(dims))
        dims[i] *= 2
    if math.prod(dims) != chips:  # 1 or 2 chips of a 3-d generation
        dims = [1, 1, 1]
        dims[0] = chips
    return tuple(dims)


def parse_tpu(name: str) -> tuple[str, tuple[int, ...]]:
    """ "v5p-64" / "v5p:4x4x2" -> (generation, chip grid)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e|tpu7x)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
    if not m:
        raise ValueError(f"unknown TPU target {name!r}; e.g. v4-32, v5p-128, v5e-16, v6e-64, tpu7x-8 or v5p:4x4x2")
    gen, count, dims = m.groups()
    _, _, rank, _, cores, _ = TPUS[gen]
    if dims:
        shape = tuple(int(d) for d in dims.split("x"))
        if len(shape) != rank:
            raise ValueError(f"{gen} grids have {rank} sides, got {dims}")
        return gen, shape
    count = int(count)
    if count % cores:
        raise ValueError(f"{name}: {gen} accelerator types count TensorCores, {cores} per chip")
    return gen, grid(count // cores, rank)


def parse_gpu(name: str) -> tuple[str, int, int]:
    """ "h100:4x8" -> ("h100", 4 hosts, 8 GPUs each); "h100:8" -> one host of 8."""
    m = re.fullmatch(r"([a-z0-9]+):(?:(\d+)x)?(\d+)", name.strip().lower())
    if not m or m.group(1) not in GPUS:
        raise ValueError(f"unknown GPU target {name!r}; e.g. h100:4x8 (hosts x GPUs), a100:8; GPUs: {GPUS}")
    return m.group(1), int(m.group(2) or 1), int(m.group(3))


def is_gpu(name: str) -> bool:
    return name.split(":")[0].strip().lower() in GPUS


def gpu_spec(gpu: str) -> str:
    return (SPECS / f"{gpu}.txtpb").read_text()


def gpu_memory(spec: str) -> int:
    found = re.search(r"device_memory_size:\s*(\d+)", spec)
    if found is None:
        raise ValueError("GPU target spec has no device_memory_size field")
    return int(found.group(1))


def host_setup() -> None:
    """Before jax starts a backend: run on the host CPU whatever plugins are installed (the CUDA plugin
    would otherwise look for a driver; JAX_PLATFORMS=cpu also skips its CUDA version check).
    `get_target` calls it too, which is early enough for libtpu (loaded at the first topology)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    # Compile-only use holds no TPU: let several processes load libtpu (it takes a lock file otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def available(platform: str) -> bool:
    """Whether deviceless compiles for `platform` ("tpu" / "gpu") can run here."""
    import importlib.util

    if platform == "tpu":
        return importlib.util.find_spec("libtpu") is not None
    try:
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
            return False
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False
    from jax._src import xla_bridge

    xla_bridge.backends()  # discovers the plugins (registration fails when jax started a CUDA check)
    return "cuda" in xla_bridge._backend_factories


def local_target() -> Target:
    """The devices of the running backend (a real GPU or TPU host), memory from the runtime."""
    import jax

    devices = tuple(jax.devices())
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise TargetUnavailable(
            f"--target=local needs an accelerator that reports its memory; this process has {devices[0].platform} "
            "devices (set JAX_PLATFORMS=cuda or tpu on a GPU/TPU host)"
        )
    return Target("local", devices[0].platform, devices, int(stats["bytes_limit"]), devices[0].device_kind)


def get_target(name: str, num_slices: int = 1) -> Target:
    """A `Target` for a TPU slice (`v5p-64`, `num_slices`), a GPU cluster (`h100:4x8`) or `local`."""
    from jax.experimental import topologies

    if name == "local":
        return local_target()
    host_setup()
    if is_gpu(name):
        gpu, hosts, per_host = parse_gpu(name)
        if num_slices != 1:
            raise ValueError("num_slices is for TPU targets; a GPU cluster is <gpu>:<hosts>x<gpus per host>")
        if not available("gpu"):
            raise TargetUnavailable("GPU targets need the CUDA plugin: pip install -e '.[aot]' (make install-aot)")
        spec = gpu_spec(gpu)
        topo = f"1x{hosts}x{per_host}"
        devices = topologies.get_topology_desc(
            platform="cuda", topology_name=gpu, target_config=spec, topology=topo
        ).devices
        return Target(name, "gpu", tuple(devices), gpu_memory(spec), devices[0].device_kind, 1, topo)
    gen, shape = parse_tpu(name)
    if not available("tpu"):
        raise TargetUnavailable("TPU targets need libtpu: pip install -e '.[aot]' (make install-aot)")
    prefix, chip_config, rank, per_chip, _, hbm = TPUS[gen]
    topo = f"{prefix}:{'x'.join(map(str, shape))}"
    host = tuple(min(s, 2) for s in shape) + (1,) * (3 - rank)
    devices = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo,
        chip_config_name=chip_config,
        chips_per_host_bounds=host,
        num_slices=num_slices,
    ).devices
    label = name if num_slices == 1 else f"{num_slices} x {name}"
    return Target(label, "tpu", tuple(devices), hbm // per_chip, devices[0].device_kind, num_slices, topo)
