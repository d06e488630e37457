"""The benchmark suite's cases run on the tiny config and report consistent rows (scripts/bench.py).

Timings here are meaningless (1 repeat, shared CPU); what is checked is that each row carries the
fields BENCHMARKS.md is made from, that the ratio is the quotient of the row's own two speeds, that
FLOPs and MFU fields follow the device, and that --profile writes a trace TensorBoard can read.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import suite as S
from openvla_jax.train.flops import bandwidth_bound_rate, hbm_bandwidth, peak_flops, predict_flops, step_flops
from openvla_jax.utils.profiling import trace_files

ROOT = Path(__file__).resolve().parents[1]
PAIR_FIELDS = (
    "case",
    "config",
    "unit",
    "units",
    "jax_s",
    "jax_per_s",
    "torch_s",
    "torch_per_s",
    "ratio",
    "torch_setting",
    "torch_fp32_s",
    "torch_bf16_s",
    "flops",
    "jax_flops_per_s",
    "mfu",
)


def check_pair(row):
    missing = [k for k in PAIR_FIELDS if k not in row]
    assert not missing, (missing, row)
    assert row["jax_per_s"] == pytest.approx(row["units"] / row["jax_s"])
    assert row["torch_per_s"] == pytest.approx(row["units"] / row["torch_s"])
    assert row["ratio"] == pytest.approx(row["jax_per_s"] / row["torch_per_s"], rel=1e-12)
    assert row["torch_s"] == min(row["torch_fp32_s"], row["torch_bf16_s"])
    assert row["torch_setting"] == (
        "bf16 autocast + sdpa" if row["torch_bf16_s"] < row["torch_fp32_s"] else "fp32 + sdpa"
    )
    assert row["jax_flops_per_s"] == pytest.approx(row["flops"] / row["jax_s"])
    timed = {k[4:-2]: v for k, v in row.items() if k in ("jax_float32_s", "jax_bfloat16_s")}
    if timed:  # JAX's best of the dtypes it was timed in, as PyTorch's
        assert row["jax_s"] == min(timed.values())
        assert row["jax_setting"] == f"{min(timed, key=timed.get)} compute"
    assert row["mfu"] == "n/a"  # CPU, no --peak_tflops


# batch 8: one train row per fake CPU device (tests/conftest.py)
OPTS = dict(repeats=1, batch=8, seq_len=16, train_len=16, predict_batches=(1, 2), torch_calls=2)


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    prof = tmp_path_factory.mktemp("prof")
    out = S.run_suite(["predict"], ["tiny"], S.Options(**OPTS, profile_dir=str(prof), jax_dtypes=("float32",)))
    return out, prof


@pytest.mark.slow  # two train-step compiles on 8 fake devices + 4 PyTorch steps: ~25 s quiet, 60 s loaded
def test_train_rows():
    out = S.run_suite(["train"], ["tiny"], S.Options(**OPTS))
    rows = [r for r in out["results"] if r["case"] == "train_step"]
    assert [r["jax_impl"] for r in rows] == ["logits at 8 supervised positions", "logits at every position"]
    assert rows[1]["jax_setting"] == "float32 compute" and "jax_bfloat16_s" in rows[0]
    for r in rows:
        check_pair(r)
        assert r["units"] == 8 and r["unit"] == "samples/s"
    from configs import model as model_configs

    cfg = model_configs.get_config("tiny")
    assert rows[0]["flops"] == step_flops(cfg, 8, 16, 8) < rows[1]["flops"] == step_flops(cfg, 8, 16, None)
    assert rows[0]["torch_s"] == rows[1]["torch_s"]  # one PyTorch measurement, two JAX variants


def test_predict_rows(tiny_rows):
    out, _ = tiny_rows
    rows = [r for r in out["results"] if r["case"] == "predict_action"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        check_pair(r)
        assert r["max_action_diff_fp32"] < 1e-9  # same actions as the fp32 reference
        assert r["bandwidth_bound_per_s"] == "n/a"  # CPU: no HBM figure
    # PyTorch is batch-1: b single calls take b times one call
    assert rows[1]["torch_s"] == pytest.approx(2 * rows[0]["torch_s"])
    meta = out["meta"]
    assert meta["backend"] == "cpu" and meta["peak_flops"] is None and meta["cores"] >= 1


def test_profile_writes_a_trace_per_case(tiny_rows):
    _, prof = tiny_rows
    names = sorted(p.name for p in prof.iterdir())
    assert names == ["predict_tiny_b1", "predict_tiny_b2"]
    for n in names:
        assert trace_files(str(prof / n)), n


def test_peaks_bandwidth_and_flops_by_hand():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("cpu") is None
    assert peak_flops("cpu", 2e12) == 2e12
    assert hbm_bandwidth("NVIDIA H200") == 4.8e12 and hbm_bandwidth("TPU v5 lite") == 0.82e12
    # 7B bf16 (15.08 GB) on an H200: 3.14 ms per token, 7 tokens per action -> 45.5 actions/s
    assert bandwidth_bound_rate(15.08e9, "NVIDIA H200") == pytest.approx(4.8e12 / (7 * 15.08e9))
    assert bandwidth_bound_rate(15.08e9, "cpu") is None
    # hand count for the tiny config, 1 image, 10-token prompt (patches 256, hidden 64, 2 layers)
    from configs import model as model_configs
    from openvla_jax.train.flops import _model_counts

    cfg = model_configs.get_config("tiny")
    c = _model_counts(cfg)
    vision = 2 * c["projector"] * 256 + sum(
        2 * t["params"] * 256 + 4 * t["run"] * t["width"] * 256**2 for t in c["towers"]
    )
    s = 266
    prefill = 2 * c["decoder"] * s + 4 * 2 * 64 * s * s + 2 * c["head"]
    steps = sum(2 * c["decoder"] + 2 * c["head"] + 4 * 2 * 64 * (s + i) for i in range(1, 7))
    assert predict_flops(cfg, 1, 10) == vision + prefill + steps
    assert c["head"] == 64 * 32064 and [t["run"] for t in c["towers"]] == [2, 2]


def test_unknown_and_missing_cases():
    with pytest.raises(ValueError, match="unknown case.*'nope'.*expected some of"):
        S.case_names("train,nope")
    assert "convert" not in S.case_names("all")
    missing = S._external("benchmarks.no_such_bench", "case_x")
    with pytest.raises(S.CaseUnavailable, match="no_such_bench.case_x.*cannot be imported"):
        missing("tiny", S.Options())
    S.CASES["_missing"] = (missing, True)
    try:
        out = S.run_suite(["_missing"], ["tiny"], S.Options(), skip_unavailable=True)
    finally:
        del S.CASES["_missing"]
    assert out["results"] == [dict(case="_missing", config="tiny", skipped=out["results"][0]["skipped"])]


def test_script_rejects_an_unknown_case():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", "trian"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "unknown case" in r.stderr and "train" in r.stderr


def test_predict_without_torch():
    """--notorch (7B on a GPU host): random weights, JAX rows only, no ratio claimed."""
    out = S.run_suite(
        ["predict"], ["tiny"], S.Options(repeats=1, predict_batches=(1,), jax_dtypes=("float32",), torch=False)
    )
    (row,) = out["results"]
    assert row["jax_per_s"] == pytest.approx(1 / row["jax_s"]) and row["flops"] > 0
    assert not any(k.startswith("torch") for k in row) and "ratio" not in row


def test_interleaved_rounds_share_the_load():
    """One call of each function per round (warm-up rounds included), or one block per function."""
    from openvla_jax.utils.timing import interleaved_medians

    calls = []
    out = interleaved_medians(dict(a=lambda: calls.append("a"), b=lambda: calls.append("b")), warmup=1, repeats=2)
    assert calls == ["a", "b"] * 3 and set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    calls.clear()  # blocks: each function warmed up and timed on its own
    interleaved_medians(
        dict(a=lambda: calls.append("a"), b=lambda: calls.append("b")), warmup=1, repeats=2, rounds=False
    )
    assert calls == ["a"] * 3 + ["b"] * 3
