"""A thin trajectory-dataset layer on tf.data (our replacement for dlimp).

A *trajectory* is a dict of tensors that all share a leading time axis `[T, ...]`; a *frame* is one
time step of it. `TrajDataset` wraps a `tf.data.Dataset` of trajectories or frames with the few
operations the RLDS pipeline needs: `traj_map`, `filter`, `flatten` (trajectories -> frames),
`frame_map`, weighted `interleave`, `with_ram_budget`, determinism, per-host sharding.

Loading is offline: a local (or any tf.io path, e.g. gs://) prepared tfds directory is read with
`tfds.builder_from_directory`, never through tfds's catalog (whose `fractal20220817_data` entry
reaches for a remote bucket). The folder name may differ from the builder name inside it: the
released `bridge_orig/1.0.0/` holds `bridge_dataset-train.tfrecord-*` files.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

AUTOTUNE = tf.data.AUTOTUNE


class DatasetNotFoundError(FileNotFoundError):
    pass


def _is_version(s: str) -> bool:
    return re.fullmatch(r"\d+\.\d+\.\d+", s) is not None


def _version_key(v: str):
    return tuple(int(p) for p in v.split("."))


def find_dataset_dir(name: str, data_dir: str | None) -> str:
    """Path of the prepared tfds dir (the one holding `dataset_info.json`) for `name`.

    `name` may be `folder`, `folder:1.0.0`, `folder/1.0.0`, or a full path (local or any tf.io
    filesystem). Without a version the highest `X.Y.Z` subfolder wins.
    """
    version = None
    if ":" in name and not name.startswith(("gs://", "s3://")) and "://" not in name:
        name, version = name.rsplit(":", 1)
    candidates = (
        [name] if (data_dir is None or os.path.isabs(name) or "://" in name) else [os.path.join(data_dir, name), name]
    )
    for root in candidates:
        if version:
            root = os.path.join(root, version)
        if tf.io.gfile.exists(os.path.join(root, "dataset_info.json")):
            return root
        if tf.io.gfile.isdir(root):
            versions = sorted(
                (v.rstrip("/") for v in tf.io.gfile.listdir(root) if _is_version(v.rstrip("/"))), key=_version_key
            )
            for v in reversed(versions):
                if tf.io.gfile.exists(os.path.join(root, v, "dataset_info.json")):
                    return os.path.join(root, v)
    have = []
    if data_dir and tf.io.gfile.isdir(data_dir):
        have = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(data_dir))
    raise DatasetNotFoundError(
        f"dataset {name!r}{':' + version if version else ''} not found: expected a prepared tfds "
        f"directory (with dataset_info.json) at {candidates[0]}[/<version>]. "
        f"data_dir={data_dir!r} contains: {have or 'nothing'}"
    )


def open_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """An offline tfds builder for a prepared RLDS dataset (see `find_dataset_dir`)."""
    return tfds.builder_from_directory(find_dataset_dir(name, data_dir))


def default_split(builder: tfds.core.DatasetBuilder, train: bool) -> str:
    """`train` / `val` when a val split exists, else `train[:95%]` / `train[95%:]`."""
    splits = set(builder.info.splits.keys())
    if "train" not in splits:
        raise ValueError(f"{builder.name}: no 'train' split (has {sorted(splits)})")
    if train:
        return "train" if "val" in splits else "train[:95%]"
    return "val" if "val" in splits else "train[95%:]"


class TrajDataset:
    """A tf.data pipeline of trajectories (or, after `flatten`, frames) with a few helpers."""

    def __init__(
        self,
        ds: tf.data.Dataset,
        *,
        name: str = "",
        deterministic: bool = False,
        num_parallel_calls: int = AUTOTUNE,
        is_flat: bool = False,
    ):
        self.ds, self.name, self.deterministic = ds, name, deterministic
        self.num_parallel_calls, self.is_flat = num_parallel_calls, is_flat

    def _new(self, ds, **kw) -> "TrajDataset":
        args: dict[str, Any] = dict(
            name=self.name,
            deterministic=self.deterministic,
            num_parallel_calls=self.num_parallel_calls,
            is_flat=self.is_flat,
        )
        args.update(kw)
        return TrajDataset(ds, **args)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_rlds(
        cls,
        builder: tfds.core.DatasetBuilder,
        split: str,
        *,
        shuffle: bool = True,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        deterministic: bool = False,
        num_parallel_reads: int = AUTOTUNE,
        num_parallel_calls: int = AUTOTUNE,
        name: str | None = None,
    ) -> "TrajDataset":
        """Episodes of `split`, this host's share only (`tfds.even_splits`: disjoint, covering).

        Each element: the episode's step fields stacked `[T, ...]` (images as encoded bytes),
        plus `traj_metadata` (episode_metadata broadcast over T), `_traj_index` (read order),
        `_episode_id` (the episode's index in its split, in the dataset's order: the same whatever
        the file shuffling or host) and `_len`. shuffle=False with num_parallel_reads=1 reads the
        files one after another: the split in its order.
        """
        host_split: tfds.typing.SplitArg = split
        if process_count > 1:
            host_split = tfds.even_splits(split, n=process_count)[process_index]
        read_config = tfds.ReadConfig(
            shuffle_seed=seed if shuffle else None,
            skip_prefetch=True,
            add_tfds_id=True,
            num_parallel_calls_for_interleave_files=num_parallel_reads,
            interleave_cycle_length=num_parallel_reads,
            try_autocache=False,
            options=_options(deterministic),
            enable_ordering_guard=False,
        )
        ds = builder.as_dataset(
            split=host_split,  # pyright: ignore[reportCallIssue]  (tfds' decorated as_dataset)
            shuffle_files=shuffle,
            read_config=read_config,
            # steps undecoded: images stay encoded bytes until a frame needs them
            decoders={"steps": tfds.decode.SkipDecoding()},
        )
        episode_index = _episode_index(builder)

        def to_traj(i, episode):
            steps = dict(episode["steps"])
            t = tf.shape(tf.nest.flatten(steps)[0])[0]
            meta = episode.get("episode_metadata", {})
            steps["traj_metadata"] = tf.nest.map_structure(lambda x: tf.repeat(x[None], t, 0), meta)
            steps["_traj_index"] = tf.repeat(tf.cast(i, tf.int64)[None], t, 0)
            steps["_episode_id"] = tf.repeat(episode_index(episode["tfds_id"])[None], t, 0)
            steps["_len"] = tf.repeat(t[None], t, 0)
            return steps

        ds = ds.enumerate().map(to_traj, num_parallel_calls=num_parallel_calls, deterministic=deterministic or None)
        return cls(ds, name=name or builder.name, deterministic=deterministic, num_parallel_calls=num_parallel_calls)

    # --- element-wise ops ----------------------------------------------------------------------
    def traj_map(self, fn: Callable[[dict], dict]) -> "TrajDataset":
        if self.is_flat:
            raise ValueError("traj_map after flatten(): use frame_map")
        return self._new(
            self.ds.map(fn, num_parallel_calls=self.num_parallel_calls, deterministic=self.deterministic or None)
        )

    def frame_map(self, fn: Callable[[dict], dict]) -> "TrajDataset":
        if not self.is_flat:
            raise ValueError("frame_map before flatten(): use traj_map")
        return self._new(
            self.ds.map(fn, num_parallel_calls=self.num_parallel_calls, deterministic=self.deterministic or None)
        )

    def filter(self, predicate: Callable[[dict], tf.Tensor]) -> "TrajDataset":
        return self._new(self.ds.filter(predicate))

    def flatten(self, cycle_length: int = 16) -> "TrajDataset":
        """Trajectories -> frames (interleaving `cycle_length` trajectories at a time)."""
        ds = self.ds.interleave(
            tf.data.Dataset.from_tensor_slices,
            cycle_length=cycle_length,
            num_parallel_calls=self.num_parallel_calls,
            deterministic=self.deterministic or None,
        )
        return self._new(ds, is_flat=True)

    def repeat(self) -> "TrajDataset":
        return self._new(self.ds.repeat())

    def shuffle(self, buffer_size: int, seed: int | None) -> "TrajDataset":
        return self._new(self.ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True))

    def with_ram_budget(self, gb: float) -> "TrajDataset":
        """Cap tf.data autotuning's buffers at `gb` GiB (0 = tf.data's default)."""
        opts = tf.data.Options()
        opts.autotune.ram_budget = int(gb * 1024**3)
        return self._new(self.ds.with_options(opts))

    def with_determinism(self, deterministic: bool = True) -> "TrajDataset":
        return self._new(self.ds.with_options(_options(deterministic)), deterministic=deterministic)

    @staticmethod
    def interleave(
        datasets: Sequence["TrajDataset"], weights: Sequence[float], seed: int | None, deterministic: bool = False
    ) -> "TrajDataset":
        """Sample elements from `datasets` with probabilities `weights` (normalised)."""
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        total = float(sum(weights))
        if total <= 0 or min(weights) < 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        ds = tf.data.Dataset.sample_from_datasets(
            [d.ds for d in datasets], [w / total for w in weights], seed=seed, stop_on_empty_dataset=False
        )
        return TrajDataset(
            ds,
            name="+".join(d.name for d in datasets),
            deterministic=deterministic,
            is_flat=all(d.is_flat for d in datasets),
        )


def _episode_index(builder: tfds.core.DatasetBuilder) -> Callable[[tf.Tensor], tf.Tensor]:
    """tfds id (`<shard file>__<record>`) -> int64 index of the episode in its split's order (-1 when
    the file is unknown): the shard's offset in the split plus the record's index in the shard."""
    files, offsets = [], []
    for split in builder.info.splits.values():
        start = 0
        for fname, n in zip(split.filenames, split.shard_lengths):
            files.append(os.path.basename(fname))
            offsets.append(start)
            start += int(n)
    files_t, offsets_t = tf.constant(files or [""]), tf.constant(offsets or [-1], tf.int64)

    def index(tfds_id: tf.Tensor) -> tf.Tensor:
        fname = tf.strings.regex_replace(tfds_id, r"__[0-9]+$", "")
        record = tf.strings.to_number(tf.strings.regex_replace(tfds_id, r"^.*__", ""), tf.int64)
        hit = tf.where(tf.equal(files_t, fname))[:, 0]
        return tf.cond(
            tf.size(hit) > 0, lambda: tf.gather(offsets_t, hit[0]) + record, lambda: tf.constant(-1, tf.int64)
        )

    return index


def _options(deterministic: bool) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = bool(deterministic)
    return opts
