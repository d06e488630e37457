"""The benchmark suite behind `scripts/bench.py`: named cases, common row fields, machine metadata.

    from benchmarks.suite import Options, run_suite
    out = run_suite(["train", "predict"], ["tiny", "small"], Options(repeats=5))

Cases (`CASES`): llama, predict, train (`benchmarks/model.py`: JAX vs the PyTorch reference), data,
convert, serve, quant and actions (`benchmarks/{data,convert,serve,quant,actions}.py`, imported when
run). Model rows carry `pair_row`'s fields;
on a known accelerator also MFU against its peak and, for predict, the bandwidth-bound rate.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import platform
from typing import Callable, Optional, Sequence


@dataclasses.dataclass
class Options:
    repeats: int = 5  # timed repeats; medians reported
    batch: int = 8  # rows for llama / train
    seq_len: int = 128  # llama forward tokens per row
    train_len: int = 48  # text tokens per train row (+ the image patches)
    predict_batches: Sequence[int] = (1, 8, 32)
    jax_dtypes: Sequence[str] = ("float32", "bfloat16")  # JAX compute dtypes timed; the faster is its best
    torch_calls: int = 8  # single PyTorch predict calls timed for its per-call rate
    interleave: bool = False  # time in rounds (noisy machine) instead of one block per function
    torch: bool = True  # time the PyTorch reference too (off: JAX only, e.g. 7B on a GPU host)
    peak_tflops: Optional[float] = None  # MFU peak of one device; default: known accelerators
    profile_dir: Optional[str] = None  # jax.profiler traces of each case's JAX side
    work_dir: Optional[str] = None  # scratch for convert


class CaseUnavailable(RuntimeError):
    """A case whose implementation is not in this tree (yet)."""


def device_info(opts: Optional[Options] = None) -> dict:
    """Kind, backend, peak FLOP/s (given or known) and HBM bandwidth (known) of the first device."""
    import jax

    from openvla_jax.train.flops import hbm_bandwidth, peak_flops

    kind = str(jax.devices()[0].device_kind)
    given = opts.peak_tflops * 1e12 if opts is not None and opts.peak_tflops else None
    return dict(
        device_kind=kind,
        backend=jax.default_backend(),
        device_count=jax.device_count(),
        peak_flops=peak_flops(kind, given),
        hbm_bytes_per_s=hbm_bandwidth(kind),
    )


def pair_row(
    opts: Options,
    case: str,
    config: str,
    unit: str,
    units: int,
    jax_s: float,
    torch: Optional[dict],
    flops: Optional[float],
    **extra,
) -> dict:
    """One measurement: `units` of `unit` done in `jax_s` seconds by JAX and `torch["torch_s"]` by PyTorch.
    ratio = jax_per_s / torch_per_s. mfu = flops / jax_s / peak, "n/a" without a peak (CPU)."""
    from openvla_jax.train.flops import bandwidth_bound_rate

    dev = device_info(opts)
    row = dict(case=case, config=config, unit=f"{unit}/s", units=units, jax_s=jax_s, jax_per_s=units / jax_s)
    if torch is not None:
        row.update(torch)
        row["torch_per_s"] = units / torch["torch_s"]
        row["ratio"] = row["jax_per_s"] / row["torch_per_s"]
    if flops is not None:
        row.update(
            flops=flops,
            jax_flops_per_s=flops / jax_s,
            mfu=flops / jax_s / dev["peak_flops"] if dev["peak_flops"] else "n/a",
        )
    weights = extra.get("weights_bytes_bf16")
    if weights:
        # Batch-b decoding still reads every weight once per token: the bound scales with b while
        # the work stays bandwidth-bound (small b).
        rate = bandwidth_bound_rate(weights, dev["device_kind"])
        row["bandwidth_bound_per_s"] = rate * units if rate else "n/a"
        row["fraction_of_bound"] = row["jax_per_s"] / row["bandwidth_bound_per_s"] if rate else "n/a"
    row.update(extra)
    return row


def _model_case(name: str) -> Callable:
    def case(variant: str, opts: Options) -> list[dict]:
        from benchmarks import model as bench_model

        return getattr(bench_model, name)(variant, opts)

    return case


def case_data(variant: str, opts: Options) -> list[dict]:
    """Frames/s to model-ready batches (augmentation off / on) vs a plain tf.data decode + resize."""
    del variant  # the data pipeline does not depend on the model size
    from benchmarks.data import bench_data

    return [dict(case="data", **bench_data(batch_size=16))]


def case_serve(variant: str, opts: Options) -> list[dict]:
    """The HTTP action server on loopback: throughput, p50/p99 latency at 1, 8, 32 clients, batching on/off."""
    from benchmarks.serve import bench_server, tiny_random_vla

    rows = bench_server(tiny_random_vla(variant), clients=(1, 8, 32), batching=(True, False), requests_per_client=16)
    return [dict(case="serve", config=variant, **r) for r in rows]


def case_convert(variant: str, opts: Options) -> list[dict]:
    """Synthetic full-size checkpoint (random bf16, real names and shapes) -> to-jax: time and peak RSS."""
    from benchmarks.convert import bench_convert

    return [dict(case="convert", config=variant, **bench_convert(variant, work_dir=opts.work_dir))]


def _external(module: str, function: str, **kwargs: Callable[[Options], object]) -> Callable:
    """A case of another benchmarks module, imported only when run."""

    def case(variant: str, opts: Options) -> list[dict]:
        try:
            fn = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as e:
            raise CaseUnavailable(f"this case runs {module}.{function}, which cannot be imported: {e}") from e
        rows = fn(variant, **{k: get(opts) for k, get in kwargs.items()})
        return [dict({"case": function.removeprefix("case_"), "config": variant}, **r) for r in rows]

    return case


# name -> (function(variant, opts) -> rows, runs once per --config variant)
CASES: dict[str, tuple[Callable, bool]] = {
    "train": (_model_case("case_train"), True),
    "predict": (_model_case("case_predict"), True),
    "llama": (_model_case("case_llama"), True),
    "data": (case_data, False),
    "convert": (case_convert, True),
    "serve": (case_serve, True),
    "quant": (
        _external(
            "benchmarks.quant",
            "case_quant",
            repeats=lambda o: o.repeats,
            batch_sizes=lambda o: tuple(o.predict_batches),
        ),
        True,
    ),
    "actions": (
        _external("benchmarks.actions", "case_actions", repeats=lambda o: o.repeats, batch=lambda o: o.batch),
        True,
    ),
}
# "all": everything but convert, which writes a 15 GB checkpoint when run at 7b.
ALL = ("train", "predict", "llama", "data", "serve", "quant", "actions")


def case_names(spec: str) -> list[str]:
    """'all' | 'train,predict' -> names, with an error that lists the cases."""
    names = list(ALL) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise ValueError(f"unknown case(s) {unknown or spec!r}; expected some of {sorted(CASES)} or 'all'")
    return names


def machine() -> dict:
    """Date, CPU, cores, memory and library versions: the header of every results file."""
    import jax

    mem = None
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            kb = next((int(line.split()[1]) for line in f if line.startswith("MemTotal")), None)
        mem = round(kb / 2**20, 1) if kb else None
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return dict(
        date=datetime.date.today().isoformat(),
        cpu=platform.machine(),
        cores=os.cpu_count(),
        mem_gib=mem,
        load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        jax=jax.__version__,
        torch=torch_version,
    )


def run_suite(
    names: Sequence[str],
    variants: Sequence[str],
    opts: Options,
    emit: Callable[[dict], None] = lambda row: None,
    skip_unavailable: bool = False,
) -> dict:
    """Run `names` x `variants`; `emit(row)` as each row arrives. -> {"meta": ..., "results": [rows]}.
    With `skip_unavailable` (used for 'all'), a case whose code is missing gives a row with `skipped`."""
    meta = dict(machine(), **device_info(opts))
    results = []
    for name in names:
        fn, per_variant = CASES[name]
        for variant in variants if per_variant else ["-"]:
            try:
                rows = fn(variant, opts)
            except CaseUnavailable as e:
                if not skip_unavailable:
                    raise
                rows = [dict(case=name, config=variant, skipped=str(e))]
            for row in rows:
                emit(row)
                results.append(row)
    return dict(meta=meta, results=results)
