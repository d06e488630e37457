"""Compile the real train step or `predict_action` for a target without its hardware, and report.

`compile_train(config, target)`: the mesh from the target's devices (`config.mesh`), the abstract
train state and batch (shapes, dtypes and shardings only), `train.step.lower_train_step`, then the
target's own compiler. `compile_predict(model_config, target, batch)`: the greedy decoder that
`OpenVLA.predict_action` runs, bf16 weights on one device (or replicated over several).

A `Report` holds per-device memory as the compiler plans it (argument, output, aliased, temporary,
generated code; peak = argument + output - aliased + temporary + code), the device's memory, the
analytic FLOPs of the step (`train.flops`: XLA's cost analysis counts a scanned layer once), the
collectives in the optimized HLO, and whether it fits: on TPU the compiler itself refuses a program
that does not (RESOURCE_EXHAUSTED); the GPU compiler does not check, so there peak > memory says so.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from typing import Any, Optional

from openvla_jax.aot.targets import GiB, Target

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Deviceless GPU compiles cannot autotune (no GPU to time kernels on): no Triton GEMM search, no
# autotuning; the program is the one XLA's heuristics pick.
GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}


@dataclasses.dataclass
class Report:
    target: str
    program: str  # "train_step <variant>" / "predict_action"
    devices: int
    device_kind: str
    memory_bytes: int  # of one device
    rows_per_device: float
    global_batch: int
    fits: bool
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    flops: float = 0.0  # analytic model FLOPs of one step / call, all devices together
    collectives: dict = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0
    error: str = ""  # the compiler's message when it refused the program
    accumulate_steps: int = 1
    text_len: int = 0
    input_formats: list = dataclasses.field(default_factory=list, repr=False)  # the arguments' device layouts
    # For `aot.run` on a local accelerator: the executable and its abstract arguments (not serialised).
    compiled: Any = dataclasses.field(default=None, repr=False, compare=False)  # jax.stages.Compiled
    inputs: tuple = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code

    def table_row(self) -> dict:
        g = lambda b: round(b / GiB, 2)  # noqa: E731
        return dict(
            target=self.target,
            program=self.program,
            devices=self.devices,
            rows_per_device=self.rows_per_device,
            global_batch=self.global_batch,
            accumulate_steps=self.accumulate_steps,
            argument_gib=g(self.argument),
            output_gib=g(self.output),
            alias_gib=g(self.alias),
            temp_gib=g(self.temp),
            code_gib=g(self.code),
            peak_gib=g(self.peak),
            device_gib=g(self.memory_bytes),
            fits=self.fits,
            flops=self.flops,
            collectives=self.collectives,
            compile_s=round(self.compile_s, 1),
            error=self.error[:300],
        )

    def format(self) -> str:
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        lines = [
            f"{self.program} on {self.target}: {self.devices} x {self.device_kind}, "
            f"{self.rows_per_device:g} rows/device (global batch {self.global_batch}"
            + (f", {self.accumulate_steps} accumulation steps" if self.accumulate_steps > 1 else "")
            + (f", {self.text_len} text tokens" if self.text_len else "")
            + ")",
        ]
        if self.error:
            lines.append(f"  does NOT fit: {self.error.strip().splitlines()[0][:400]}")
        else:
            lines += [
                f"  per device:  argument {g(self.argument)}  output {g(self.output)}  aliased {g(self.alias)}",
                f"               temporary {g(self.temp)}  code {g(self.code)}",
                f"               peak {g(self.peak)} of {g(self.memory_bytes)}  -> "
                + ("fits" if self.fits else "does NOT fit"),
                "  collectives: " + (", ".join(f"{k} x{v}" for k, v in self.collectives.items()) or "none"),
            ]
        if self.flops:
            lines.append(f"  model FLOPs per step: {self.flops:.3e} ({self.flops / self.devices:.3e} per device)")
        if self.compile_s:
            lines.append(f"  compiled in {self.compile_s:.0f} s")
        return "\n".join(lines)


def count_collectives(hlo_text: str) -> dict:
    """Collective ops in optimized HLO text (async pairs counted once, by their -start)."""
    counts = Counter()
    for op in COLLECTIVES:
        n = len(re.findall(rf"= [^=\n]*? {op}(?:-start)?\(", hlo_text))
        if n:
            counts[op] = n
    return dict(counts)


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text and "memory" in text


def compile_options(target: Target) -> Optional[dict]:
    # A real local GPU autotunes as training would; only a deviceless compile needs the options off.
    return dict(GPU_OPTIONS) if target.platform == "gpu" and target.name != "local" else None


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s / arrays (the largest shard,
    from shapes alone): what the compiler reports as that program's argument size."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def tiled_bytes(shape, dtype, layout=None) -> int:
    """Bytes of one array of `shape` in a device `layout` (`jax.Array.format.layout`): the minor-most
    dims, in the layout's order, rounded up to its first tile (TPU: e.g. (8, 128)); no tiling: plain."""
    import numpy as np

    dims = list(shape) or [1]
    tiles = getattr(layout, "tiling", None) or ()
    if tiles and tiles[0]:
        assert layout is not None  # a tiling comes from a layout
        order = list(layout.major_to_minor) if shape else [0]
        dims = [dims[i] for i in order]
        tile = tiles[0]
        for j, t in enumerate(tile):
            k = len(dims) - len(tile) + j
            if k >= 0:
                dims[k] = -(-dims[k] // t) * t
    return int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def argument_bytes(args, formats) -> int:
    """Per-device bytes of the arguments `args` (sharded `ShapeDtypeStruct`s) in the input `formats`
    a compiled program chose (`compiled.input_formats[0]`): the shard shapes, tiled."""
    import jax

    leaves = jax.tree.leaves(args)
    return sum(tiled_bytes(x.sharding.shard_shape(x.shape), x.dtype, f.layout) for x, f in zip(leaves, formats))


def _arguments_fit(report: Report, *trees) -> bool:
    """The arguments alone against the device's memory, before compiling: a state that cannot even be
    held is reported without a compile (a 7B compile takes many minutes on a CPU)."""
    need = sum(per_device_bytes(t) for t in trees)
    if need <= report.memory_bytes:
        return True
    report.argument = need
    report.fits = False
    report.error = (
        f"the arguments alone need {need / GiB:.2f} GiB per device (state and batch shards, from their "
        f"shapes) of the {report.memory_bytes / GiB:.2f} GiB a {report.device_kind} has; not compiled"
    )
    return False


def _finish(report: Report, lowered, target: Target, save: Optional[str] = None) -> Report:
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  (the compiler's own error types differ per backend)
        report.compile_s = time.perf_counter() - t0
        if not _is_oom(e):
            raise
        report.fits, report.error = False, str(e)
        return report
    report.compile_s = time.perf_counter() - t0
    report.compiled = compiled
    m = compiled.memory_analysis()
    report.argument = int(m.argument_size_in_bytes)
    report.output = int(m.output_size_in_bytes)
    report.alias = int(m.alias_size_in_bytes)
    report.temp = int(m.temp_size_in_bytes)
    report.code = int(m.generated_code_size_in_bytes)
    report.fits = report.peak <= report.memory_bytes
    try:
        import jax

        report.input_formats = jax.tree.leaves(compiled.input_formats[0])  # one per argument leaf
    except Exception:  # noqa: BLE001
        report.input_formats = []
    try:
        report.collectives = count_collectives(compiled.as_text())
    except Exception:  # noqa: BLE001
        report.collectives = {}
    if save:
        save_executable(compiled, save)
    return report


def save_executable(compiled, path: str) -> None:
    """The serialized executable (`jax.experimental.serialize_executable`), loadable on the target."""
    import pickle

    from jax.experimental.serialize_executable import serialize

    payload, in_tree, out_tree = serialize(compiled)
    with open(path, "wb") as f:
        pickle.dump(dict(executable=payload, in_tree=in_tree, out_tree=out_tree), f)


def num_datasets(config) -> int:
    """Datasets of the config's mixture, from the mixture table (no data opened)."""
    mixture = config.data.get("mixture", "")
    if not mixture:
        return 1
    from openvla_jax.data.oxe.mixtures import get_mixture

    return len(get_mixture(mixture))


def train_mesh(config, target: Target):
    from openvla_jax.parallel.mesh import make_mesh

    mesh_cfg = config.mesh
    if target.num_slices > 1 and all(int(mesh_cfg.get(f"dcn_{a}", 1)) == 1 for a in ("data", "fsdp", "tensor")):
        mesh_cfg = mesh_cfg.copy_and_resolve_references()
        mesh_cfg.dcn_data = target.num_slices  # replicas across slices, FSDP within each (DCN is slow)
    return make_mesh(mesh_cfg, target.devices)


def compile_train(
    config,
    target: Target,
    rows_per_device: Optional[float] = None,
    text_len: int = 64,
    save: Optional[str] = None,
    precheck: bool = True,
) -> Report:
    """Lower and compile the real train step of `config` (a `configs/train.py` config) for `target`.
    `rows_per_device`: per-device batch (default: config.data.batch_size spread over the devices);
    `text_len`: text tokens per row (the pipeline pads a batch to its longest prompt, 16-aligned).
    `precheck`: report a state too big to hold at all without compiling (`precheck=False`: always
    ask the compiler)."""
    from openvla_jax.models.config import as_config
    from openvla_jax.parallel import rules as R
    from openvla_jax.train.flops import step_flops
    from openvla_jax.train.loop import build_module, supervised_tokens
    from openvla_jax.train.optimizer import make_optimizer
    from openvla_jax.train.step import (
        abstract_batch,
        abstract_params,
        abstract_train_state,
        lower_train_step,
        make_train_step,
        select_batch,
        train_state_shardings,
    )

    mesh = train_mesh(config, target)
    n = target.num_devices
    rows = int(round(rows_per_device * n)) if rows_per_device else int(config.data.batch_size)
    module = build_module(config)
    if config.get("lora") is not None:  # LoRA on a frozen (maybe quantized) base: its own step and state
        return _compile_lora(config, target, module, mesh, rows, text_len, save, precheck)
    optimizer, schedule = make_optimizer(config.optimizer, abstract_params(module))
    shardings = train_state_shardings(module, optimizer, mesh, R.RULES)
    k = supervised_tokens(config)
    datasets = num_datasets(config)
    accumulate = int(config.optimizer.accumulate_steps)
    step = make_train_step(
        module,
        optimizer,
        schedule,
        mesh,
        R.RULES,
        num_datasets=datasets,
        accumulate_steps=accumulate,
        freeze=config.optimizer.freeze,
        supervised_tokens=k,
        state_shardings=shardings,
        compiler_options=compile_options(target),
    )
    state = abstract_train_state(module, optimizer, shardings, config.optimizer)
    batch = abstract_batch(module, mesh, rows, text_len, datasets)
    report = Report(
        target=target.name,
        program=f"train_step {config.get('variant', '')}".strip(),
        devices=n,
        device_kind=target.device_kind,
        memory_bytes=target.memory_bytes,
        rows_per_device=rows / n,
        global_batch=rows,
        fits=False,
        flops=step_flops(as_config(config.model), rows, text_len, k),
        accumulate_steps=accumulate,
        text_len=text_len,
    )
    report.inputs = (state, select_batch(batch))
    if precheck and not _arguments_fit(report, state, batch):
        return report
    lowered = lower_train_step(step, state, batch, mesh, R.RULES)
    return _finish(report, lowered, target, save)


def _compile_lora(config, target: Target, module, mesh, rows: int, text_len: int, save, precheck) -> Report:
    """`compile_train` for a config with a `lora` section: the adapters' train state and the frozen
    base (`base_dtype`, `base_quant`) as sharded shapes, lowered by `train.trainable.Lora`."""
    from openvla_jax.models.config import as_config
    from openvla_jax.parallel import rules as R
    from openvla_jax.train.flops import step_flops
    from openvla_jax.train.loop import supervised_tokens
    from openvla_jax.train.step import abstract_batch
    from openvla_jax.train.trainable import Lora, lora_config_of

    k = supervised_tokens(config)
    datasets = num_datasets(config)
    lora = Lora(
        config,
        module,
        mesh,
        R.RULES,
        lora_config_of(config),
        num_datasets=datasets,
        supervised_tokens=k,
        load=False,
        compiler_options=compile_options(target),
    )
    state, base = lora.abstract_inputs()
    batch = abstract_batch(module, mesh, rows, text_len, datasets)
    quant = lora.quant if lora.quant != "none" else str(lora.dtype)
    report = Report(
        target=target.name,
        program=f"train_step {config.get('variant', '')} r={lora.lora.rank}, {quant} base".strip(),
        devices=target.num_devices,
        device_kind=target.device_kind,
        memory_bytes=target.memory_bytes,
        rows_per_device=rows / target.num_devices,
        global_batch=rows,
        fits=False,
        flops=step_flops(as_config(config.model), rows, text_len, k),
        text_len=text_len,
    )
    if precheck and not _arguments_fit(report, state, base, batch):
        return report
    return _finish(report, lora.lower(state, base, batch), target, save)


def compile_predict(
    model_config,
    target: Target,
    batch: int = 1,
    prompt_len: int = 32,
    save: Optional[str] = None,
    precheck: bool = True,
) -> Report:
    """Lower and compile `predict_action`'s decoder (bf16 weights, `batch` images, `prompt_len`-token
    prompts) on the target's devices: weights replicated, rows split over the devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from openvla_jax.models import decoding
    from openvla_jax.models import vla as vla_lib
    from openvla_jax.models.config import as_config
    from openvla_jax.train.flops import predict_flops
    from openvla_jax.train.step import abstract_params, sample_inputs

    cfg = as_config(model_config)
    # Layers scanned: the same weights and cache, a much shorter program to compile than 32 unrolled.
    module = vla_lib.from_config(cfg, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    mesh = Mesh(np.asarray(target.devices), ("batch",))
    rep = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("batch")) if batch % target.num_devices == 0 else rep
    import flax.linen as nn

    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=rep), nn.meta.unbox(abstract_params(module))
    )
    pixels, _ = sample_inputs(module, batch, prompt_len)
    pv = jax.ShapeDtypeStruct(pixels.shape, jnp.float32, sharding=rows)
    ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=rows)
    opts = cfg.actions
    n_tokens = opts.action_dim * opts.action_chunk
    if module.parallel:
        fn = lambda p, pv, ids, m: decoding.parallel_decode(module, p, pv, ids, m, None)  # noqa: E731
    else:
        fn = lambda p, pv, ids, m: decoding.greedy_decode(module, p, pv, ids, m, num_tokens=n_tokens)  # noqa: E731
    from openvla_jax.models.common import traced_for

    report = Report(
        target=target.name,
        program="predict_action",
        devices=target.num_devices,
        device_kind=target.device_kind,
        memory_bytes=target.memory_bytes,
        rows_per_device=batch / target.num_devices,
        global_batch=batch,
        fits=False,
        flops=predict_flops(cfg, batch, prompt_len, n_tokens),
        text_len=prompt_len,
    )
    if precheck and not _arguments_fit(report, params, (pv, ids, mask)):
        return report
    with traced_for(mesh):
        lowered = jax.jit(fn, compiler_options=compile_options(target)).lower(params, pv, ids, mask)
    return _finish(report, lowered, target, save)


_USED = re.compile(r"[Uu]sed\s+([0-9.]+)([KMGT])i?B?\s+of\s+([0-9.]+)([KMGT])i?B?")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refused_peak(error: str) -> Optional[int]:
    """The bytes a refused TPU program needed, from the compiler's "Used 16.98G of 15.75G hbm"."""
    m = _USED.search(error or "")
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def linear_estimate(points: list, memory: int) -> Optional[int]:
    """Largest batch whose peak stays under `memory`, on the line through the two largest-batch points
    (peak grows linearly in rows once the weights and optimizer state are counted). None without two
    points or a positive slope."""
    pts = sorted(dict(points).items())[-2:]
    if len(pts) < 2:
        return None
    (b1, p1), (b2, p2) = pts
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:
        return None
    return int(b2 + (memory - p2) // slope)


def find_max_batch(compile_at, start: int = 1, limit: int = 4096) -> tuple[int, list[Report]]:
    """Largest per-device batch b (integer) for which `compile_at(b)` fits. Each compile of a 7B step
    takes minutes, so the search is guided: peak memory is close to linear in the batch, and once two
    compiles give a peak (a fit, or a TPU refusal quoting what it needed) the next try is the line's
    estimate of the edge; a try that does not halve the bracket is followed by a plain bisection step,
    so the search never takes more than about twice a bisection's compiles. Without estimates it
    doubles from `start`, then bisects. -> (b or 0, every report)."""
    reports, points = [], []
    good, bad = 0, None

    def attempt(b: int) -> Report:
        r = compile_at(b)
        reports.append(r)
        peak = r.peak if not r.error else refused_peak(r.error)
        if peak:
            points.append((b, peak))
        return r

    b = start
    while True:
        r = attempt(b)
        if not r.fits:
            bad = b
            break
        good = b
        if b >= limit:
            break
        est = linear_estimate(points, r.memory_bytes)
        b = min(limit, b * 2 if est is None else max(est, b + 1))
    if bad is None:
        return good, reports
    guess = True
    while bad - good > 1:
        width = bad - good
        est = linear_estimate(points, reports[-1].memory_bytes) if guess else None
        mid = (good + bad) // 2 if est is None else min(max(est, good + 1), bad - 1)
        r = attempt(mid)
        good, bad = (mid, bad) if r.fits else (good, mid)
        guess = not guess or 2 * (bad - good) <= width  # a guess that did not halve: bisect once
    return good, reports
