"""Benchmarks of weight-only quantization: greedy action latency in bf16 / int8 / int4 on the tiny and
small models, and the 7B model's parameter memory from shapes.

    from benchmarks.quant import case_quant, memory_rows
    rows = case_quant("tiny", repeats=5, batch_sizes=(1, 8))   # = scripts/bench.py --case quant
    rows = memory_rows("7b")                                   # nothing allocated: shapes only

Latency: `OpenVLA` built directly from random params (as the tests do), compute dtype bf16 in every
mode (int8 / int4 kernels are dequantized to bf16 inside the jitted decode), fixed preprocessed
pixels `[B, S, S, 6]` and fixed prompt ids (BOS + 20 ids), so neither the tokenizer nor image
preprocessing is timed: one `action_token_ids` call = prefill + 6 cached greedy steps, jitted,
warmed up, median over `repeats`. Weight-only quantization saves memory and (on a bandwidth-bound
accelerator) weight reads; on a CPU the dequantize is extra work, so expect ratios >= 1 there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from openvla_jax.quant.memory import GIB, memory_report
from openvla_jax.quant.weights import DEFAULT_GROUP_SIZE, MODES, param_bytes, total_bytes

PROMPT_LEN = 21  # BOS + 20 ids: about an OpenVLA prompt ("In: What action ... to {task}?\nOut:")


def random_params(model_config, seed: int = 0) -> dict:
    """fp32 NumPy params of `model_config` from the model's own initialisers (host memory)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from openvla_jax.models import vla as vla_lib

    module = vla_lib.from_config(model_config, dtype=jnp.float32, param_dtype=jnp.float32)
    size = model_config.vision.image_size
    init = jax.jit(
        lambda k: nn.meta.unbox(module.init(k, jnp.zeros((1, size, size, 6)), jnp.zeros((1, 4), jnp.int32))["params"])
    )
    return jax.tree.map(np.asarray, init(jax.random.key(seed)))


def case_quant(
    variant: str,
    *,
    repeats: int = 5,
    batch_sizes: Sequence[int] = (1, 8),
    group_size: Optional[int] = DEFAULT_GROUP_SIZE,
    dtype: str = "bfloat16",
    model_config=None,
) -> list[dict]:
    """-> one row per (mode, batch): case, config, variant (bf16 / int8 / int4), batch, ms (median
    per call), ms_vs_bf16 (ms / bf16's ms at that batch), linear_bytes / total_bytes (params on device),
    linear_ratio (vs bf16), agree (fraction of greedy action ids equal to bf16's)."""
    from configs import model as model_configs
    from openvla_jax.policy import OpenVLA
    from openvla_jax.utils.timing import median_seconds

    cfg = model_config if model_config is not None else model_configs.get_config(variant)
    params = random_params(cfg)
    rng = np.random.default_rng(0)
    n, size = max(batch_sizes), cfg.vision.image_size
    pixels = rng.normal(size=(n, size, size, 6)).astype(np.float32)
    ids = rng.integers(3, 31000, size=(n, PROMPT_LEN)).astype(np.int32)
    ids[:, 0] = 1
    rows, ref = [], {}
    for mode in ("bf16",) + MODES:
        vla = OpenVLA(cfg, params, dtype=dtype, quantize=None if mode == "bf16" else mode, group_size=group_size)
        linear, total = param_bytes(vla.params), total_bytes(vla.params)
        for b in batch_sizes:
            pv, x = pixels[:b], ids[:b]
            got = vla.action_token_ids(pv, x)  # also the compile
            ms = 1e3 * median_seconds(lambda v=vla, pv=pv, x=x: v.action_token_ids(pv, x), warmup=1, repeats=repeats)
            if mode == "bf16":
                ref[b] = dict(ms=ms, ids=got, linear=linear)
            rows.append(
                dict(
                    case="quant",
                    config=variant,
                    variant=mode,
                    batch=b,
                    ms=ms,
                    ms_vs_bf16=ms / ref[b]["ms"],
                    linear_bytes=linear,
                    total_bytes=total,
                    linear_ratio=linear / ref[b]["linear"],
                    agree=float(np.mean(got == ref[b]["ids"])),
                    dtype=dtype,
                    group_size=group_size,
                    repeats=repeats,
                )
            )
        del vla
    return rows


def memory_rows(variant: str = "7b", group_size: Optional[int] = DEFAULT_GROUP_SIZE) -> list[dict]:
    """-> one row per mode (bf16 / int8 / int4): peak parameter memory of `variant` from shapes
    (`quant.memory_report`): linear / other / total GiB, linear_ratio and total_ratio vs bf16."""
    from configs import model as model_configs

    report = memory_report(model_configs.get_config(variant), group_size)
    bf16 = report["bf16"]["total_bytes"]
    return [
        dict(
            case="quant_memory",
            config=variant,
            variant=mode,
            linear_gib=r["linear_bytes"] / GIB,
            other_gib=r["other_bytes"] / GIB,
            total_gib=r["total_gib"],
            linear_ratio=r["linear_ratio"],
            total_ratio=r["total_bytes"] / bf16,
            group_size=group_size,
        )
        for mode, r in report.items()
    ]


def format_rows(rows: list[dict]) -> str:
    """Markdown tables of `case_quant` / `memory_rows` rows."""
    lat = [r for r in rows if r["case"] == "quant"]
    mem = [r for r in rows if r["case"] == "quant_memory"]
    out = []
    if lat:
        out += [
            "| config | weights | batch | ms / call | vs bf16 | linear MB | total MB | linear vs bf16 | ids = bf16 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['config']} | {r['variant']} | {r['batch']} | {r['ms']:.1f} | {r['ms_vs_bf16']:.2f}x | "
            f"{r['linear_bytes'] / 1e6:.1f} | {r['total_bytes'] / 1e6:.1f} | {r['linear_ratio']:.3f} | "
            f"{r['agree']:.2f} |"
            for r in lat
        ]
    if mem:
        out += [""] if out else []
        out += [
            "| config | weights | linear GiB | other GiB | total GiB | linear vs bf16 | total vs bf16 |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['config']} | {r['variant']} | {r['linear_gib']:.2f} | {r['other_gib']:.2f} | "
            f"{r['total_gib']:.2f} | {r['linear_ratio']:.3f} | {r['total_ratio']:.3f} |"
            for r in mem
        ]
    return "\n".join(out)


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = memory_rows("7b")
    for variant in args.configs.split(","):
        rows += case_quant(
            variant, repeats=args.repeats, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(","))
        )
    print(format_rows(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
