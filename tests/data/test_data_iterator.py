"""CheckpointableIterator: exact resume from a saved position, the skip fallback, bad states."""

import os

import numpy as np
import pytest

from openvla_jax.data.iterator import CheckpointableIterator, IteratorStateError
from openvla_jax.data.rlds import DataConfig, RLDSPipeline
from tests.support.rlds_fixtures import load_script


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    mod = load_script("make_demo_data")
    out = mod.make_demo_data(str(tmp_path_factory.mktemp("demo") / "demo"), episodes=12, seed=3)
    from openvla_jax.tokenizer.text import TextTokenizer

    return out, TextTokenizer(out)


def pipeline(demo, **kw):
    out, tok = demo
    args = dict(
        data_dir=out,
        mixture="demo_tabletop",
        batch_size=4,
        image_size=32,
        shuffle_buffer=64,
        statistics_dir=os.path.join(out, "stats"),
        process_index=0,
        process_count=1,
        progress=False,
        deterministic=True,
        augment=True,
        seed=5,
    )
    args.update(kw)
    return RLDSPipeline(DataConfig(**args), tok)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_restored_iterator_continues_with_the_same_batches(demo, tmp_path):
    it = iter(pipeline(demo))
    assert isinstance(it, CheckpointableIterator)
    first = take(it, 3)
    it.save(tmp_path / "state")
    want = take(it, 4)  # what the uninterrupted run sees next
    assert it.position == 7
    assert want[0]["dataset_name"].dtype.kind == "U" and want[0]["pixel_values"].shape == (4, 32, 32, 6)

    resumed = CheckpointableIterator(pipeline(demo)).restore(tmp_path / "state")
    assert resumed.position == 3
    assert_same(take(resumed, 4), want)
    # Not vacuous: a fresh iterator starts over (different batches), and the batches do differ.
    fresh = take(iter(pipeline(demo)), 4)
    assert_same(fresh[:3], first)
    assert not np.array_equal(fresh[0]["input_ids"], want[0]["input_ids"]) or not np.array_equal(
        fresh[0]["pixel_values"], want[0]["pixel_values"]
    )


def test_skip_fallback_gives_the_same_batches(demo):
    it = iter(pipeline(demo))
    take(it, 5)
    want = take(it, 3)
    skipped = CheckpointableIterator(pipeline(demo)).skip(5)
    assert skipped.position == 5
    assert_same(take(skipped, 3), want)


def test_state_holds_the_shuffle_buffer(demo, tmp_path):
    sizes = {}
    for buf in (8, 512):
        it = iter(pipeline(demo, shuffle_buffer=buf, augment=False))
        take(it, 2)
        it.save(tmp_path / str(buf))
        sizes[buf] = it.state_bytes(tmp_path / str(buf))
        assert os.path.exists(tmp_path / str(buf) / "process_0" / "state.json")
    # 504 more buffered frames, each ~1 kB as stored (its PNG frame, input_ids/labels/mask of 104
    # tokens): the shuffle buffer is part of the state, so its size grows with the buffer.
    assert sizes[512] - sizes[8] > 504 * 500, sizes


def test_bad_states_raise(demo, tmp_path):
    it = iter(pipeline(demo))
    take(it, 2)
    d = it.save(tmp_path / "s")
    with pytest.raises(IteratorStateError, match="no saved iterator position"):
        CheckpointableIterator(pipeline(demo)).restore(tmp_path / "elsewhere")
    # another host's state is not this host's
    with pytest.raises(IteratorStateError, match="process_1"):
        CheckpointableIterator(pipeline(demo), process_index=1).restore(tmp_path / "s")
    # a pipeline built from another config (tf.data itself would load it silently): the error names
    # the fields and says to skip instead
    with pytest.raises(IteratorStateError, match=r"batch_size: saved 4, now 2.*shuffle_buffer.*skip\(2\)"):
        CheckpointableIterator(pipeline(demo, batch_size=2, shuffle_buffer=8)).restore(tmp_path / "s")
    data = [f for f in os.listdir(d) if ".data-" in f][0]
    with open(os.path.join(d, data), "r+b") as f:
        f.truncate(100)
    with pytest.raises(IteratorStateError, match=f"{data} is 100 bytes, expected"):
        CheckpointableIterator(pipeline(demo)).restore(tmp_path / "s")


def test_resume_through_train_checkpointer(demo, tmp_path):
    """The loop's path: the data position saved with a training checkpoint, restored from it, or
    (fallback) a fresh pipeline skipped by the recorded position."""
    from openvla_jax.checkpoints.training import TrainCheckpointer

    it = iter(pipeline(demo))
    take(it, 2)
    with TrainCheckpointer(tmp_path, save_every=2, keep_last=2) as ckpt:
        assert ckpt.save(2, {"w": np.zeros(2, np.float32)}, {"m": np.zeros(2, np.float32)}, {}, data_iterator=it)
    want = take(it, 2)
    ckpt = TrainCheckpointer(tmp_path, save_every=2, keep_last=2)
    meta = ckpt.restore_meta()
    assert meta["data_position"] == 2 and meta["data_state"] == "data_state/2"
    resumed = CheckpointableIterator(pipeline(demo))
    ckpt.restore_data_iterator(2, resumed)
    assert_same(take(resumed, 2), want)
    assert_same(take(CheckpointableIterator(pipeline(demo)).skip(meta["data_position"]), 2), want)
    ckpt.close()


def test_state_from_before_a_new_config_field_restores_at_its_default(demo, tmp_path):
    """A run saved before DataConfig grew a field (e.g. `proprio`, `image_views`) resumes when the
    field is at its default (the old pipeline behaved as the default), and not when it is set."""
    import json

    it = iter(pipeline(demo))
    take(it, 2)
    want = take(it, 2)
    it = iter(pipeline(demo))
    take(it, 2)
    d = it.save(tmp_path / "s")
    state_file = os.path.join(d, "state.json")
    state = json.loads(open(state_file).read())
    for field in ("proprio", "pad_missing_views", "image_views"):
        del state["fingerprint"][field]  # as an older version wrote it
    open(state_file, "w").write(json.dumps(state))
    resumed = CheckpointableIterator(pipeline(demo)).restore(tmp_path / "s")
    assert_same(take(resumed, 2), want)
    with pytest.raises(IteratorStateError, match="pad_missing_views: saved False, now True"):
        CheckpointableIterator(pipeline(demo, pad_missing_views=True)).restore(tmp_path / "s")
