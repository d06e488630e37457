"""TrainCheckpointer: sharded round trips, retention, integrity errors, interrupted saves (simulated
and a real crash before finalization), SIGTERM in a toy loop, and the export `OpenVLA.load` reads."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from openvla_jax.checkpoints.training import MANIFEST, CheckpointError, TrainCheckpointer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))


def state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jax.device_put(rng.normal(size=(8, 12)).astype(np.float32), NamedSharding(mesh, P("fsdp", None))),
        "emb": jax.device_put(rng.normal(size=(16, 4)).astype(jnp.bfloat16), NamedSharding(mesh, P(None, "fsdp"))),
        "b": {"bias": jax.device_put(rng.normal(size=(12,)).astype(np.float32), NamedSharding(mesh, P()))},
    }
    opt = optax.adamw(1e-3).init(params)
    opt = jax.tree.map(lambda x: x + 1, opt)  # non-trivial moments
    return params, opt


def abstract(tree, sharding_fn):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), tree)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def steps_on_disk(ckpt):
    return sorted(int(p.name) for p in ckpt.directory.iterdir() if p.name.isdigit())


def test_sharded_round_trip_into_requested_shardings(mesh, tmp_path):
    params, opt = state(mesh)
    key = jax.random.key_data(jax.random.PRNGKey(3))
    with TrainCheckpointer(tmp_path, save_every=10, keep_last=3) as ckpt:
        assert ckpt.save(5, params, opt, {"rng": key, "typed": jax.random.key(3), "note": "x"}, force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 5
        # Restore into shardings other than the saved ones: each leaf lands as requested.
        want = {
            "w": NamedSharding(mesh, P(None, "fsdp")),
            "emb": NamedSharding(mesh, P("fsdp", None)),
            "b": {"bias": NamedSharding(mesh, P("data"))},
        }
        abs_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, want)
        repl = NamedSharding(mesh, P())
        abs_opt = abstract(opt, lambda x: repl)
        got_p, got_o, meta = ckpt.restore(abstract_params=abs_params, abstract_opt_state=abs_opt)
        assert_tree_equal(got_p, params)
        assert_tree_equal(got_o, opt)
        assert type(got_o[0]).__name__ == "ScaleByAdamState"  # optax structure, not plain dicts
        for leaf, s in zip(jax.tree.leaves(got_p), jax.tree.leaves(want)):
            assert leaf.sharding == s
        assert all(x.sharding == repl for x in jax.tree.leaves(got_o))
        assert meta == {"rng": np.asarray(key).tolist(), "typed": np.asarray(key).tolist(), "note": "x", "step": 5}
        # Params alone: into shardings, and onto one device for export.
        only = ckpt.restore_params(5, abs_params)
        assert_tree_equal(only, params)
        assert only["w"].sharding == want["w"]
        host = ckpt.restore_params()
        assert_tree_equal(host, params)
        assert len(host["w"].sharding.device_set) == 1 and host["emb"].dtype == jnp.bfloat16
        assert ckpt.restore_meta()["note"] == "x"


class FakeDataIterator:
    """Stands in for CheckpointableIterator: writes one file per save."""

    def __init__(self):
        self.position = 0

    def save(self, path):
        d = Path(path) / "process_0"
        d.mkdir(parents=True, exist_ok=True)
        (d / "state.json").write_text(json.dumps({"position": self.position}))


def test_retention_schedule_and_data_states(mesh, tmp_path):
    params, opt = state(mesh)
    it = FakeDataIterator()
    ckpt = TrainCheckpointer(tmp_path, save_every=1, keep_last=2, keep_every=4)
    for step in range(1, 11):
        it.position = step * 3
        assert ckpt.save(step, params, opt, {}, data_iterator=it)
    ckpt.close()
    # The last 2 (9, 10) plus every multiple of 4 (4, 8); nothing else, no temp dirs left.
    assert sorted(os.listdir(ckpt.directory)) == ["10", "4", "8", "9"]
    assert ckpt.all_steps() == [4, 8, 9, 10]
    assert sorted(os.listdir(tmp_path / "data_state"), key=int) == ["4", "8", "9", "10"]
    assert all((ckpt.step_dir(s) / MANIFEST).exists() for s in (4, 8, 9, 10))
    assert ckpt.restore_meta(8) == {"step": 8, "data_state": "data_state/8", "data_position": 24}

    every3 = TrainCheckpointer(tmp_path / "b", save_every=3, keep_last=5, async_save=False)
    saved = [s for s in range(1, 8) if every3.save(s, params, opt, {})]
    assert not every3.save(6, params, opt, {}, force=True)  # already saved: not overwritten
    assert every3.save(7, params, opt, {}, force=True)  # off schedule (a preemption save)
    every3.close()
    assert saved == [3, 6] and every3.all_steps() == [3, 6, 7]


def _corrupt_setup(mesh, tmp_path):
    params, opt = state(mesh)
    with TrainCheckpointer(tmp_path, save_every=1, keep_last=5) as ckpt:
        ckpt.save(1, params, opt, {})
        ckpt.save(2, *state(mesh, seed=1), {})
    abs_args = dict(
        abstract_params=abstract(params, lambda x: x.sharding), abstract_opt_state=abstract(opt, lambda x: x.sharding)
    )
    return TrainCheckpointer(tmp_path, save_every=1, keep_last=5), abs_args


def _largest_file(step_dir, item):
    files = [p for p in (step_dir / item).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_missing_truncated_or_corrupt_file_fails_restore(mesh, tmp_path):
    ckpt, abs_args = _corrupt_setup(mesh, tmp_path)
    d2 = ckpt.step_dir(2)
    victim = _largest_file(d2, "params")
    rel = str(victim.relative_to(d2))
    victim.unlink()
    # The latest step is damaged: restoring "the latest" must fail, not fall back or start fresh.
    with pytest.raises(CheckpointError, match=f"step 2: file {rel} is missing.*expected \\d+ bytes"):
        ckpt.restore(**abs_args)
    with pytest.raises(CheckpointError, match=f"step 2: file {rel} is missing"):
        ckpt.restore_params(2)
    params, _, _ = ckpt.restore(1, **abs_args)  # the other step is intact
    assert_tree_equal(params, state(mesh)[0])

    d1 = ckpt.step_dir(1)
    victim = _largest_file(d1, "opt_state")
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    rel = str(victim.relative_to(d1))
    with pytest.raises(CheckpointError, match=f"step 1: file {rel} is {size // 2} bytes, expected {size}"):
        ckpt.restore(1, **abs_args)

    shutil.rmtree(tmp_path / "checkpoints")  # same size, one byte flipped: the crc32 catches it
    ckpt, abs_args = _corrupt_setup(mesh, tmp_path)
    victim = _largest_file(ckpt.step_dir(2), "params")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="crc32 .* expected .* \\(corrupt\\)"):
        ckpt.restore(2, **abs_args)
    ckpt.close()


def test_interrupted_save_is_never_resumed(mesh, tmp_path, caplog):
    ckpt, abs_args = _corrupt_setup(mesh, tmp_path)
    ckpt.close()
    # Step 3 renamed into place without our manifest (e.g. a crash between rename and manifest
    # in commit-file mode), step 4 left as orbax's unfinalized temp dir.
    shutil.copytree(ckpt.step_dir(2), ckpt.step_dir(3))
    (ckpt.step_dir(3) / MANIFEST).unlink()
    shutil.copytree(ckpt.step_dir(2), ckpt.directory / "4.orbax-checkpoint-tmp")
    with caplog.at_level("WARNING"):
        resumed = TrainCheckpointer(tmp_path, save_every=1, keep_last=5)
    assert resumed.latest_step() == 2 and resumed.all_steps() == [1, 2]
    assert "interrupted save" in caplog.text
    aside = [p for p in os.listdir(resumed.directory) if p.startswith("3.incomplete-")]
    assert len(aside) == 1  # moved aside, kept for inspection, not a step any more
    for _ in range(50):  # orbax deletes leftover temp dirs at start, in the background
        if not (resumed.directory / "4.orbax-checkpoint-tmp").exists():
            break
        time.sleep(0.1)
    assert not (resumed.directory / "4.orbax-checkpoint-tmp").exists()
    _, _, meta = resumed.restore(**abs_args)
    assert meta["step"] == 2
    with pytest.raises(CheckpointError, match=r"no checkpoint step 3 .* complete steps: \[1, 2\]"):
        resumed.restore(3, **abs_args)
    # The resumed run saves steps 3 and 4 again as usual.
    params, opt = state(mesh, seed=3)
    assert resumed.save(3, params, opt, {}) and resumed.save(4, params, opt, {})
    resumed.close()
    assert resumed.all_steps() == [1, 2, 3, 4]
    assert_tree_equal(resumed.restore(3, **abs_args)[0], params)


CRASH = """
import os, sys
import numpy as np
from openvla_jax.checkpoints.training import TrainCheckpointer
ckpt = TrainCheckpointer(sys.argv[1], save_every=1, keep_last=3)
ckpt.save(1, {"w": np.full((64,), 1.0, np.float32)}, {"m": np.zeros(3, np.float32)}, {})
ckpt.wait()
orig = ckpt._write_manifest
def crash():  # everything is written into the temp dir; die before orbax renames it
    orig()
    os._exit(17)
ckpt._write_manifest = crash
ckpt.save(2, {"w": np.full((64,), 2.0, np.float32)}, {"m": np.ones(3, np.float32)}, {})
ckpt.wait()
print("not reached")
"""


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def test_crash_before_finalization_resumes_previous_step(tmp_path):
    """What orbax 0.12.8 does on a crash between writing and finalizing: the data sits in
    `<step>.orbax-checkpoint-tmp`, never listed as a step; the previous step is resumed."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "w")], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 17, r.stderr[-2000:]
    names = sorted(os.listdir(tmp_path / "w" / "checkpoints"))
    assert "1" in names and "2" not in names and "2.orbax-checkpoint-tmp" in names, names
    ckpt = TrainCheckpointer(tmp_path / "w", save_every=1, keep_last=3)
    assert ckpt.latest_step() == 1
    params = ckpt.restore_params()
    np.testing.assert_array_equal(np.asarray(params["w"]), np.full((64,), 1.0, np.float32))
    assert ckpt.save(2, {"w": np.full((64,), 3.0, np.float32)}, {"m": np.ones(3, np.float32)}, {})
    ckpt.close()  # the step can be saved again after the crash
    np.testing.assert_array_equal(np.asarray(ckpt.restore_params(2)["w"]), 3.0)


TOY_LOOP = """
import sys, time
import numpy as np
from openvla_jax.checkpoints.training import TrainCheckpointer
from openvla_jax.train.preemption import PreemptionWatcher

workdir, last = sys.argv[1], int(sys.argv[2])
ckpt = TrainCheckpointer(workdir, save_every=4, keep_last=2)
start, w, m = 0, np.zeros(3, np.float32), np.zeros(3, np.float32)
if ckpt.latest_step() is not None:
    import jax
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), t)
    p, o, meta = ckpt.restore(abstract_params=spec({"w": w}), abstract_opt_state=spec({"m": m}))
    start, w, m = meta["step"], np.asarray(p["w"]), np.asarray(o["m"])
    print("resumed", start, flush=True)
with PreemptionWatcher() as watcher:
    for step in range(start + 1, last + 1):
        g = np.sin(w + step).astype(np.float32)          # a toy "gradient step"
        m = (0.9 * m + g).astype(np.float32)
        w = (w - 0.1 * m).astype(np.float32)
        print("loss", step, float(np.sum(w * w)), flush=True)
        time.sleep(0.08)
        if watcher.should_stop(step):
            ckpt.save(step, {"w": w}, {"m": m}, {"reason": "preempted"}, force=True)
            ckpt.close()
            print("preempted", step, flush=True)
            sys.exit(0)
        ckpt.save(step, {"w": w}, {"m": m}, {})
ckpt.close()
print("done", flush=True)
"""


def _losses(out):
    return {int(line.split()[1]): float(line.split()[2]) for line in out.splitlines() if line.startswith("loss")}


def test_sigterm_saves_current_step_and_resume_continues(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY_LOOP)
    full = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "full"), "20"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert full.returncode == 0 and "done" in full.stdout, full.stderr[-2000:]
    want = _losses(full.stdout)

    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), "20"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("loss 6 "):  # step 6: between the regular saves at 4 and 8
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    k = int(out.split("preempted")[1].split()[0])
    assert 6 <= k < 20, out  # saved at the step it was on when the signal came (not the end)
    ckpt = TrainCheckpointer(tmp_path / "run", save_every=4, keep_last=2)
    assert ckpt.latest_step() == k and ckpt.restore_meta()["reason"] == "preempted"

    resumed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run"), "20"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {k}" in resumed.stdout
    got = {**_losses(out), **_losses(resumed.stdout)}
    assert min(_losses(resumed.stdout)) == k + 1
    assert got == want  # bit-identical losses for every step, before and after the preemption


def test_export_for_inference_loads_with_openvla(tmp_path):
    from configs.model import get_config
    from openvla_jax import OpenVLA
    from openvla_jax.models import vla as vla_lib

    cfg = get_config("tiny")
    module = vla_lib.from_config(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    pv = rng.normal(size=(1, 224, 224, 6)).astype(np.float32)
    ids = rng.integers(0, 32000, size=(1, 6)).astype(np.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pv, ids)["params"]  # init compiles for 13 s
    params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.normal(size=s.shape), s.dtype), shapes)
    stats = {"demo_tabletop": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7}}}
    with TrainCheckpointer(tmp_path, save_every=1, keep_last=1) as ckpt:
        ckpt.write_config({"model": cfg.to_dict(), "lr": 2e-5})
        ckpt.write_dataset_statistics(stats)
        ckpt.save(3, params, {"count": np.zeros((), np.int32)}, {})
        ckpt.wait()
        out = ckpt.export_for_inference(3, tmp_path / "export", cfg)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 2e-5
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    vla = OpenVLA.load(out, dtype="float32")
    assert vla.norm_stats == stats
    ref = np.asarray(jax.jit(module.apply)({"params": params}, pv, ids, np.ones_like(ids)))
    got = vla.logits(pv, ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


TWO_HOSTS = """
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from openvla_jax.parallel import distributed
from openvla_jax.checkpoints.training import TrainCheckpointer
from openvla_jax.train.preemption import PreemptionWatcher

pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
assert distributed.maybe_initialize(f"localhost:{port}", 2, pid)
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
w = jax.make_array_from_callback((16,), NamedSharding(mesh, P("fsdp")), lambda i: np.arange(16, dtype=np.float32)[i])
step_fn = jax.jit(lambda x: x * 0.5 + 1.0)
ckpt = TrainCheckpointer(workdir, save_every=1000, keep_last=2)
with PreemptionWatcher() as watcher:
    for step in range(1, 400):
        w = step_fn(w)
        print("step", pid, step, flush=True)
        time.sleep(0.03)
        if watcher.should_stop(step):
            ckpt.save(step, {"w": w}, {"m": w}, {"signalled": watcher.requested}, force=True)
            ckpt.close()
            print("STOPPED", pid, step, watcher.requested, flush=True)
            sys.exit(0)
print("NOT STOPPED", pid, flush=True)
"""


def test_two_hosts_stop_at_the_same_step_when_one_is_signalled(tmp_path, mesh):
    """Two processes x 4 CPU devices: only process 1 gets SIGTERM; both agree on the step, save the
    sharded array collectively (manifest by process 0), and the checkpoint restores on one process."""
    import socket

    script = tmp_path / "two.py"
    script.write_text(TWO_HOSTS)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in _env().items() if not k.startswith(("JAX_", "XLA_"))}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / "w")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    head = []
    for line in procs[1].stdout:
        head.append(line)
        if line.startswith("step 1 5"):
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = [procs[0].communicate(timeout=120)[0], "".join(head) + procs[1].communicate(timeout=120)[0]]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    stops = [line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("STOPPED")]
    assert len(stops) == 2 and stops[0][1] == stops[1][1], outs
    assert {s[0]: s[2] for s in stops} == {"0": "False", "1": "True"}  # only process 1 was signalled
    k = int(stops[0][1])
    assert 5 <= k < 399
    ckpt = TrainCheckpointer(tmp_path / "w", save_every=1000, keep_last=2)
    assert ckpt.latest_step() == k and ckpt.restore_meta()["signalled"] is False  # process 0's meta
    files = json.loads((ckpt.step_dir(k) / MANIFEST).read_text())["files"]
    assert any("ocdbt.process_1" in f for f in files) and any("ocdbt.process_0" in f for f in files)
    spec = jax.ShapeDtypeStruct((16,), np.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    params, opt, _ = ckpt.restore(abstract_params={"w": spec}, abstract_opt_state={"m": spec})
    want = np.arange(16, dtype=np.float32)
    for _ in range(k):
        want = want * np.float32(0.5) + np.float32(1.0)
    np.testing.assert_array_equal(np.asarray(params["w"]), want)
    assert params["w"].sharding == spec.sharding
