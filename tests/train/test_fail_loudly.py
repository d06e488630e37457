"""Training fails loudly and early: a checkpoint save that fails in the background is found at the
next step (not the next save) with its cause as the last line; one trainer per work dir (a lock the
kernel drops when its holder dies, even by SIGKILL); a work dir with only incomplete checkpoints is
not trained over from step 0 unless asked; a resumed run's metrics.jsonl has one row per step;
skipped episodes are counted once each, per dataset and reason, in the metrics and the summary."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from openvla_jax.checkpoints.training import CheckpointError, TrainCheckpointer
from openvla_jax.train.lock import LOCK_FILE, WorkdirLock, WorkdirLocked

ROOT = Path(__file__).resolve().parents[2]


def _state(value: float):
    return {"w": np.full((64,), value, np.float32)}, {"m": np.zeros(3, np.float32)}


def _until(fn, seconds: float = 60.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = fn()
        if got is not None:
            return got
        time.sleep(0.02)
    raise AssertionError(f"nothing after {seconds} s")


# ------------------------------------------------------------------------ a failed background save
@pytest.fixture
def failing_background_write(monkeypatch):
    """Orbax's background thread fails for step 2, as a full disk fails it (after `save` returned)."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer as A

    real = A._background_wait_for_commit_futures

    def failing(directory, *args, **kwargs):
        if Path(str(directory)).name == "2":
            raise OSError(28, "No space left on device", str(directory))
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(A, "_background_wait_for_commit_futures", failing)


def test_a_failed_background_save_is_found_by_poll_before_the_next_save(tmp_path, failing_background_write):
    ckpt = TrainCheckpointer(tmp_path, save_every=1000, keep_last=3)
    assert ckpt.save(1, *_state(1.0), {}, force=True)
    _until(lambda: True if ckpt.poll() is None and ckpt._pending is None else None)  # saved and checked
    assert ckpt.save(2, *_state(2.0), {}, force=True)  # returns: the write goes on in the background
    error = _until(ckpt.poll)  # no further save needed to find it
    assert isinstance(error, CheckpointError)
    assert "checkpoint step 2 failed in the background" in str(error) and "No space left on device" in str(error)
    assert ckpt.poll() is error  # kept: every later call sees it
    with pytest.raises(CheckpointError, match="step 2 failed"):
        ckpt.save(3, *_state(3.0), {}, force=True)  # never saves past a lost step
    with pytest.raises(CheckpointError, match="step 2 failed"):
        ckpt.wait()
    ckpt.close()  # quiet: the failure was raised already
    assert TrainCheckpointer(tmp_path, save_every=1000, keep_last=3).latest_step() == 1


def test_a_failed_manifest_write_is_found_by_poll(tmp_path, monkeypatch):
    from openvla_jax.checkpoints import training

    def broken(step_dir, checksum=True):
        raise PermissionError(13, "Permission denied", str(step_dir))

    ckpt = TrainCheckpointer(tmp_path, save_every=1000, keep_last=3)
    monkeypatch.setattr(training, "build_manifest", broken)
    assert ckpt.save(1, *_state(1.0), {}, force=True)
    error = _until(ckpt.poll)
    assert "step 1 failed in the background (writing its manifest" in str(error)
    assert "PermissionError: [Errno 13] Permission denied" in str(error)
    ckpt.close()


# --------------------------------------------------------------------------------------- the lock
HOLD = """
import sys, time
from openvla_jax.train.lock import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLocked, match=f"in use by another trainer \\(pid {proc.pid} on host "):
            WorkdirLock(tmp_path).acquire()
        assert socket.gethostname() in json.loads((tmp_path / LOCK_FILE).read_text())["host"]
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the lock file stays, naming it
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid
    with WorkdirLock(tmp_path):  # the kernel released the dead holder's flock
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):  # a second lock, even in-process
            WorkdirLock(tmp_path).acquire()
    WorkdirLock(tmp_path).acquire().release()  # released on exit


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from tests.support.rlds_fixtures import load_script

    out = tmp_path_factory.mktemp("data") / "demo"
    return load_script("make_demo_data").make_demo_data(str(out), episodes=12, val_fraction=0.25, seed=3)


def _config(data_dir, steps=1):
    from tests.support.train_runner import small_config

    return small_config(str(data_dir), steps)


def test_train_refuses_a_locked_workdir_before_touching_it(tmp_path):
    from openvla_jax.train.loop import train

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 3, "train/loss": 1.0}\n')
    with WorkdirLock(workdir):
        with pytest.raises(WorkdirLocked, match=f"{workdir} is in use by another trainer \\(pid {os.getpid()}"):
            train(_config(tmp_path / "no-data-needed"), workdir)
    assert (workdir / "metrics.jsonl").read_text() == '{"step": 3, "train/loss": 1.0}\n'  # untouched


# ------------------------------------------------------------------------ no silent fresh start
class _PastTheChecks(Exception):
    pass


def test_checkpoints_without_a_valid_manifest_refuse_a_fresh_start_unless_allowed(demo_dir, tmp_path, monkeypatch):
    from openvla_jax.data import rlds
    from openvla_jax.train.loop import train

    def stop(*args, **kwargs):  # the data pipeline is built right after the resume decision
        raise _PastTheChecks

    monkeypatch.setattr(rlds, "RLDSPipeline", stop)
    workdir = tmp_path / "run"
    for step in (2, 4):  # step dirs whose manifests are gone
        (workdir / "checkpoints" / str(step) / "params").mkdir(parents=True)
        (workdir / "checkpoints" / str(step) / "params" / "x").write_bytes(b"0" * 10)
    for attempt in range(2):  # the first start moves them aside as <step>.incomplete-<time>: still refused
        with pytest.raises(CheckpointError, match=r"holds checkpoint dirs \['2.*, '4.*\] but none is complete"):
            train(_config(demo_dir), workdir)
    assert sorted(p.name.split(".")[0] for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    config = _config(demo_dir)
    config.train.allow_fresh_start = True
    with pytest.raises(_PastTheChecks):
        train(config, workdir)

    fresh = tmp_path / "fresh"  # an interrupted first save (orbax temp dir only) had nothing to lose
    (fresh / "checkpoints" / "2.orbax-checkpoint-tmp").mkdir(parents=True)
    with pytest.raises(_PastTheChecks):
        train(_config(demo_dir), fresh)


# ------------------------------------------------------------------------------- metrics rows
def test_resumed_metrics_drop_the_rows_after_the_checkpoint(tmp_path):
    from openvla_jax.train.loop import MetricsWriter

    rows = [json.dumps({"step": s, "train/loss": 10.0 - s}) for s in range(1, 7)]
    rows.insert(4, json.dumps({"step": 4, "offline/l1": 0.5}))  # an evaluation row of step 4
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 7, "train/lo')  # killed mid-row
    writer = MetricsWriter(tmp_path, ["demo"], enabled=True, resume_step=4)
    for step in (5, 6):
        writer.write(step, {"loss": np.float32(1.0)})
    writer.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in got if r["step"] > 4] == [1.0, 1.0]  # the resumed run's
    assert [r for r in got if "offline/l1" in r] == [{"step": 4, "offline/l1": 0.5}]  # before the save: kept


# ----------------------------------------------------------------------------- skipped episodes
def test_bad_data_log_counts_each_episode_once_per_reason():
    from openvla_jax.data.prepare import BadDataLog

    log = BadDataLog()
    for _ in range(3):  # three passes over the same data
        log.record(b"a", b"/ep/0", b"language_instruction (empty in every step)", 0)
        log.record(b"a", b"/ep/1", b"action (NaN or inf)", 1)
        log.record(b"b", b"/ep/0", b"action (NaN or inf)", 0)
    log.record(b"a", b"/ep/5", b"action (NaN or inf)", -1)  # no index: told apart by its name
    log.record(b"a", b"/ep/5", b"action (NaN or inf)", -1)
    assert log.total() == 4
    assert log.by_reason() == {"a": {"action": 2, "language_instruction": 1}, "b": {"action": 1}}


def test_pipeline_counts_an_unlabeled_episode_once_over_many_passes(tmp_path):
    from openvla_jax.data.rlds import RLDSPipeline
    from openvla_jax.tokenizer.text import TextTokenizer
    from openvla_jax.train.loop import skipped_episodes, skipped_metrics
    from tests.support.rlds_fixtures import make_cfg, train_tiny_sentencepiece, write_libero

    name = "libero_10_no_noops"

    def unlabeled(e, steps):
        if e == 1:
            steps["language_instruction"] = [""] * len(steps["action"])

    write_libero(str(tmp_path), name=name, n_episodes=3, T=(3, 4), override=unlabeled)
    tok = TextTokenizer(train_tiny_sentencepiece(str(tmp_path / "tok")))
    data = type("D", (), dict(dir=str(tmp_path), stats_dir=str(tmp_path / "stats")))
    pipe = RLDSPipeline(make_cfg(data, mixture=name, batch_size=4, shuffle_buffer=4), tok)
    for _, _batch in zip(range(12), pipe):  # 48 frames of 2 labeled episodes of 3-4 steps: >= 6 passes
        pass
    assert pipe.skipped.total() == 1
    assert skipped_episodes(pipe) == {name: {"language_instruction": 1}}
    assert skipped_metrics(skipped_episodes(pipe)) == {
        "data/skipped_episodes": 1,
        f"data/skipped/{name}/language_instruction": 1,
    }


# ------------------------------------------------------------------------------- end to end
DRIVER = """
import os, runpy, sys
import tensorflow as tf
from orbax.checkpoint._src.checkpointers import async_checkpointer as A
from openvla_jax.data import transforms as X

fail = os.environ.get("FAIL_STEP")
real = A._background_wait_for_commit_futures
def failing(directory, *args, **kwargs):  # a full disk, found by orbax's background thread
    if fail and str(directory).rstrip("/").endswith("/" + fail):
        raise OSError(28, "No space left on device", str(directory))
    return real(directory, *args, **kwargs)
A._background_wait_for_commit_futures = failing
labeled = X.is_labeled
X.is_labeled = lambda traj: tf.logical_and(labeled(traj), tf.reduce_all(traj["episode_id"] != 0))  # episode 0: none
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


@pytest.mark.slow  # two runs of scripts/train.py on the tiny model: ~2-4 min on 2 shared cores
def test_a_failed_save_stops_the_next_step_and_the_resumed_run_logs_each_step_once(demo_dir, tmp_path):
    """Run 1: saves every 2 steps, the save of step 4 fails in the background: the run stops at step
    4 or 5 (before, at step 6, the next save) with exit code 3 and the cause as the last line of
    stderr. Run 2 resumes from step 2: metrics.jsonl then holds steps 1..8 once each. Both report
    the one unlabeled episode (of 9) once, in the rows and at the end, though the pipeline reads
    past one pass over the 76 frames (8 steps of 8 plus a 64-frame shuffle buffer)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    workdir = tmp_path / "run"
    flags = [
        "--config=configs/train.py:demo",
        f"--workdir={workdir}",
        f"--config.data.data_dir={demo_dir}",
        f"--config.data.tokenizer_dir={demo_dir}",
        f"--config.compilation_cache_dir={tmp_path / 'jax_cache'}",
        "--config.model.llm.num_hidden_layers=1",
        "--config.data.batch_size=8",
        "--config.data.shuffle_buffer=64",
        "--config.data.num_parallel_calls=1",
        "--config.data.num_parallel_reads=1",
        "--config.train.steps=8",
        "--config.train.save_every=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.progress=False",
    ]
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
    )

    def run(**extra):
        cmd = [sys.executable, str(driver), str(ROOT / "scripts" / "train.py"), *flags]
        return subprocess.run(cmd, capture_output=True, text=True, env=dict(env, **extra), cwd=ROOT, timeout=900)

    def rows():
        return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]

    failed = run(FAIL_STEP="4")
    assert failed.returncode == 3, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: CheckpointError: checkpoint step 4 failed in the background"), last
    assert "OSError: [Errno 28] No space left on device" in last
    assert max(r["step"] for r in rows()) in (4, 5)  # not 6, the next save
    assert rows()[-1]["data/skipped/demo_tabletop/language_instruction"] == 1

    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: done at step 8" in done.stdout
    assert 'skipped by the data pipeline: {"demo_tabletop": {"language_instruction": 1}}' in done.stdout
    steps = [r["step"] for r in rows() if "train/loss" in r]
    assert steps == list(range(1, 9)), steps  # steps 3..4/5 of the failed run were dropped, then logged again
    counts = [r["data/skipped_episodes"] for r in rows() if "train/loss" in r]
    assert max(counts) == counts[-1] == 1, counts  # 0 until the pipeline reads episode 0, then 1 for good


def test_exit_with_cause_leaves_the_cause_as_the_last_line(tmp_path):
    """train.py and finetune.py end a fatal error through it: the cause is the last thing on stderr,
    whatever the teardown writes after it, and the exit code is 3."""
    from openvla_jax.checkpoints.training import CheckpointError
    from openvla_jax.train.lock import WorkdirLocked
    from openvla_jax.train.loop import TrainingDiverged
    from openvla_jax.utils.fatal import EXIT_CODE, fatal_errors

    assert set(fatal_errors()) == {TrainingDiverged, CheckpointError, WorkdirLocked}
    code = (
        "import sys, os\n"
        "from openvla_jax.utils.fatal import exit_with_cause\n"
        "rc = exit_with_cause('finetune.py', RuntimeError('checkpoint step 4 failed: disk full'))\n"
        "print('teardown noise', file=sys.stderr)\n"
        "os.write(2, b'C++ teardown noise')\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert out.returncode == EXIT_CODE == 3
    assert out.stderr.strip().splitlines()[-1] == "finetune.py: RuntimeError: checkpoint step 4 failed: disk full"
    assert "noise" not in out.stderr
