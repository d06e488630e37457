"""LoRA runs through `train/loop.py` like pretraining and full fine-tuning, each run in its own
process (`tests/support/train_runner.py --lora 4`, on 2 fake devices: mesh fsdp=2): a hard kill
after a completed checkpoint resumes from it and repeats the uninterrupted run's losses and adapters
(the adapters, their Adam state, step, RNG and data position come back; the frozen base comes from
init_from again), and the export (base + merged adapters) loads with OpenVLA.load."""

import json
import signal

import numpy as np
import pytest

from tests.train.test_train_loop import losses, run

STEPS = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(the demo data dir, a converted checkpoint of the runner's small model with random weights)."""
    from tests.support.train_runner import demo_data_and_random_base

    tmp = tmp_path_factory.mktemp("lora_loop")
    data_dir, base = demo_data_and_random_base(tmp, seed=3)
    return data_dir, base, tmp / "runs"  # one parent: the runs share train_runner's compilation cache


@pytest.mark.slow  # three runs of the loop in subprocesses: ~3-6 min on 2 shared cores
def test_lora_resumes_after_a_hard_kill_like_the_main_loop(inputs):
    from openvla_jax import OpenVLA
    from openvla_jax.train import lora as LO

    data_dir, base, runs = inputs
    full_dir, kill_dir = runs / "full", runs / "kill"
    proc = run(data_dir, full_dir, STEPS, "--lora", 4, init_from=base)
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1])
    assert summary["trainable"] > 0 and summary.get("resumed_from") is None
    full = losses(full_dir)
    assert sorted(full) == list(range(1, STEPS + 1)) and len(set(full.values())) == STEPS

    run(data_dir, kill_dir, STEPS, "--lora", 4, "--kill-after-save", 2, init_from=base, expect_rc=-signal.SIGKILL)
    assert (kill_dir / "checkpoints" / "2" / "manifest.json").exists()
    assert (kill_dir / "adapters" / LO.ADAPTERS_FILE).exists()  # written beside checkpoint 2
    proc = run(data_dir, kill_dir, STEPS, "--lora", 4, init_from=base)
    assert '"resumed_from": 2' in proc.stdout and '"step": 4' in proc.stdout
    resumed = losses(kill_dir)
    for step in (3, 4):
        np.testing.assert_allclose(resumed[step], full[step], rtol=1e-6, err_msg=f"step {step}")
    a, cfg = LO.load_adapters(kill_dir / "adapters")
    b, _ = LO.load_adapters(full_dir / "adapters")
    assert cfg.rank == 4 and set(a) == set(b)
    for p in a:
        np.testing.assert_allclose(a[p]["A"], b[p]["A"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a[p]["B"], b[p]["B"], rtol=1e-5, atol=1e-7)
    # checkpoints hold the adapters only, never the frozen base
    ckpt_bytes = sum(
        f.stat().st_size for f in (kill_dir / "checkpoints" / str(STEPS) / "params").rglob("*") if f.is_file()
    )
    base_bytes = sum(f.stat().st_size for f in (base / "params").rglob("*") if f.is_file())
    assert ckpt_bytes < base_bytes / 4, (ckpt_bytes, base_bytes)
    # the offline evaluation ran on the merged model, and the merged export loads and predicts
    offline = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines() if "offline/" in x]
    assert len(offline) == 1 and 0 <= offline[0]["offline/action_accuracy"] <= 1
    vla = OpenVLA.load(kill_dir / "export", dtype="float32")
    assert set(vla.norm_stats) == {"demo_tabletop"}
    actions = vla.predict_action(np.zeros((1, 128, 128, 3), np.uint8), ["pick up the red block"], "demo_tabletop")
    assert actions.shape == (1, 7) and np.all(np.isfinite(actions))
