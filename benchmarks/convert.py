"""Conversion benchmark: a synthetic full-size checkpoint through `scripts/convert.py to-jax`.

`write_synthetic_hf()` streams random bf16 tensors with the real key names and shapes of a
`configs/model.py` variant (for `7b`, those of `openvla-7b`) into sharded safetensors plus
`config.json`, one tensor in memory at a time. `bench_convert()` then runs the converter in a child
process and reports its wall time and peak resident memory (the child's `ru_maxrss`), beside the
peak of a child that only imports the same modules, so the conversion's own cost is visible.
Called from `scripts/bench.py --case convert`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BF16 = np.dtype(ml_dtypes.bfloat16)


def write_synthetic_hf(out_dir, variant: str = "7b", seed: int = 0, max_shard_size: str = "5GB") -> dict:
    """Random bf16 OpenVLA HF directory for `variant`; returns {"bytes", "tensors", "seconds"}."""
    from configs import model as model_configs
    from openvla_jax.convert.hf import vla_specs, write_shards
    from openvla_jax.convert.hf_config import generation_config, hf_config_from_model_config

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = model_configs.get_config(variant)
    specs = vla_specs(model_config, scanned=False)
    rng = np.random.default_rng(seed)

    def get(key):
        shape = shapes[key]
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= 0.02
        return x.astype(BF16)

    shapes = {s.hf_key: s.hf_shape for s in specs}
    total = write_shards(out_dir, [(s.hf_key, s.hf_shape, BF16) for s in specs], get, max_shard_size)
    (out_dir / "config.json").write_text(json.dumps(hf_config_from_model_config(model_config, None, "bfloat16")))
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config()))
    return dict(bytes=total, tensors=len(specs), seconds=time.perf_counter() - start)


_CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
import jax, orbax.checkpoint  # what the converter imports anyway: the baseline
from openvla_jax.checkpoints import converted as checkpoint
if {convert!r}:
    t = time.perf_counter()
    checkpoint.convert_to_jax({src!r}, {out!r}, scanned={scanned!r})
    print("SECONDS", time.perf_counter() - t)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _child(convert: bool, src="", out="", scanned=False) -> dict:
    code = _CHILD.format(root=str(ROOT), convert=convert, src=str(src), out=str(out), scanned=scanned)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"conversion child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    vals = dict(line.split() for line in proc.stdout.splitlines() if line.startswith(("SECONDS", "MAXRSS_KB")))
    return dict(seconds=float(vals.get("SECONDS", "nan")), peak_rss_gb=int(vals["MAXRSS_KB"]) * 1024 / 1e9)


def bench_convert(variant: str = "7b", work_dir=None, scanned: bool = False, keep: bool = False) -> dict:
    """Write a synthetic `variant` checkpoint, convert it to JAX in a child process; measure."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="openvla_convert_bench_"))
    src, out = work / "hf", work / "jax"
    try:
        if not (src / "config.json").exists():
            written = write_synthetic_hf(src, variant)
        else:
            written = dict(bytes=sum(p.stat().st_size for p in src.glob("*.safetensors")), seconds=0.0)
        shutil.rmtree(out, ignore_errors=True)
        base = _child(False)
        conv = _child(True, src, out, scanned)
        out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        largest = _largest_tensor_bytes(src)
        return dict(
            case="convert_to_jax",
            config=variant,
            scanned=scanned,
            checkpoint_gb=written["bytes"] / 1e9,
            largest_tensor_gb=largest / 1e9,
            write_synthetic_s=written["seconds"],
            seconds=conv["seconds"],
            gb_per_s=written["bytes"] / 1e9 / conv["seconds"],
            peak_rss_gb=conv["peak_rss_gb"],
            baseline_rss_gb=base["peak_rss_gb"],
            conversion_rss_gb=conv["peak_rss_gb"] - base["peak_rss_gb"],
            output_gb=out_bytes / 1e9,
        )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _largest_tensor_bytes(src: Path) -> int:
    from openvla_jax.convert.io import open_state_dict

    reader = open_state_dict(src)
    return max(int(np.prod(s, dtype=np.int64)) * 2 for s in reader.shapes.values())


if __name__ == "__main__":
    print(json.dumps(bench_convert(sys.argv[1] if len(sys.argv) > 1 else "small")))
