"""The RLDS -> model-batch pipeline (OpenVLA's `make_interleaved_dataset` path), on our tf.data layer (`traj.py`).

Per dataset:  statistics over every episode of every split (labeled or not) -> read this host's
              episodes -> standardize (dataset config) -> validate [+ filter unlabeled] -> normalize
              -> [max_action / max_proprio filters] -> chunk -> [subsample] -> tokenize (once per
              trajectory) -> flatten -> [the dataset's chunk filter, e.g. DROID's idle frames].
Mixture:      weighted interleave (weight x transitions when balanced) -> shuffle ->
              decode + resize (+ augment when training) -> batch -> trim to a bucketed length.
`shuffle=False` reads each dataset's split in its order, whole episodes in sequence, no shuffle
buffer (debugging, exact reproduction); `dataset_length` is the epoch length in frames.

Batches (this host's slice of the global batch, `B = batch_size // process_count`):
    pixel_values   float32 [B, S, S, 6]   DINOv2-normalised RGB, then SigLIP-normalised RGB
                   float32 [B, N, S, S, 6] with `image_views` (N cameras, in that order)
                   uint8 [B, (N,) S, S, 3] with `pixels="uint8"`: raw RGB, normalised by the model
                   on the device (8x fewer bytes to move; most of the host's per-frame work)
    proprio        float32 [B, P]         only with `proprio=True`: normalised state of the frame
    input_ids      int32   [B, L]         right-padded with the pad id, L a multiple of seq_bucket
    attention_mask bool    [B, L]
    labels         int32   [B, L]         -100 except the action tokens and the EOS
    action         float32 [B, K, A]      normalised actions of the chunk (K = window + future)
    dataset_name   str     [B]
    episode_id     int64   [B]            only with `episode_info=True`: the episode's index in its
    timestep       int32   [B]            split (dataset order) and the frame's index in the episode
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow as tf

from openvla_jax.data import normalize as N
from openvla_jax.data import statistics as S
from openvla_jax.data import transforms as X
from openvla_jax.data.oxe import get_dataset_config, loadable_mixture
from openvla_jax.data.prepare import (
    MARK,
    BadDataLog,
    DataError,
    as_data_error,
    frame_fields,
    image_field,
    make_standardize,
    make_tokenize,
    make_validator,
)
from openvla_jax.data.traj import AUTOTUNE, TrajDataset, default_split, open_builder
from openvla_jax.models.preprocess import FUSED_MEAN, FUSED_STD
from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.tokenizer.text import TextTokenizer

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DataError", "RLDSPipeline", "compute_dataset_statistics", "make_pipeline", "make_standardize"]


@dataclasses.dataclass
class DataConfig:
    data_dir: str
    mixture: str | Sequence = "bridge"  # named mixture, a dataset name, or [(name, weight)]
    train: bool = True
    batch_size: int = 8  # global batch; each host yields batch_size // process_count
    image_size: int = 224
    image_view: str = "primary"
    image_views: tuple[str, ...] | None = None  # several cameras (OFT): pixel_values [B, N, S, S, 6]
    pad_missing_views: bool = False  # a dataset without a view: black image, not DataError
    proprio: bool = False  # batches carry proprio [B, P] (bounds on proprio stats)
    window_size: int = 1
    future_action_window_size: int = 0
    subsample_length: int | None = None
    normalization: str = N.BOUNDS_Q99
    balance_weights: bool = True
    skip_unlabeled: bool = True  # drop (and count) episodes without any instruction
    max_action: float | None = None  # drop episodes with any |normalised action| above this
    max_proprio: float | None = None  # likewise for the normalised proprio (when loaded)
    on_bad_data: str = "raise"  # "raise" or "skip" (skipped episodes are counted)
    augment: bool = False  # applied only when train=True
    pixels: str = "float32"  # "uint8": raw RGB batches, normalised by the model on the device
    shuffle: bool = True  # False: the split in its order, no shuffle buffer
    shuffle_buffer: int = 256_000
    episode_info: bool = False  # batches carry episode_id and timestep
    seed: int = 7
    deterministic: bool = False
    ram_budget_gb: float = 0.0
    max_prompt_len: int = 96  # prompt tokens (BOS .. "▁") before the actions
    seq_bucket: int = 16  # batches are padded to a multiple of this
    num_parallel_calls: int = AUTOTUNE
    num_parallel_reads: int = AUTOTUNE
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None
    statistics_dir: str | None = None  # None: the dataset dir, else ~/.cache/openvla_jax
    dataset_statistics: dict | None = None  # given (e.g. a checkpoint's): skip computing
    prefetch: int = 2
    progress: bool = True


def _check_views(cfg: DataConfig) -> tuple[str, ...] | None:
    """`cfg.image_views` as a tuple (None: one camera, `image_view`), after checking it."""
    if cfg.image_views is None:
        return None
    views = (cfg.image_views,) if isinstance(cfg.image_views, str) else tuple(cfg.image_views)
    if not views or len(set(views)) != len(views) or not all(isinstance(v, str) and v for v in views):
        raise ValueError(f"image_views must be distinct non-empty camera names, got {cfg.image_views!r}")
    if cfg.window_size != 1:
        raise ValueError(
            f"image_views={views} needs window_size=1 (got {cfg.window_size}): "
            "several cameras with an observation history are not supported (OFT uses 1)"
        )
    return views


def _process_info(cfg: DataConfig) -> tuple[int, int]:
    if cfg.process_index is not None and cfg.process_count is not None:
        return cfg.process_index, cfg.process_count
    import jax

    return jax.process_index(), jax.process_count()


# --- the pipeline --------------------------------------------------------------------------------


class RLDSPipeline:
    """Builds the tf.data pipeline for `cfg`; iterate it for numpy batches (this host's slice)."""

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, action_tokenizer: ActionTokenizer | None = None):
        self.cfg, self.tok = cfg, tokenizer
        self.act_tok = action_tokenizer or ActionTokenizer(vocab_size=tokenizer.sp_vocab_size)
        self.process_index, self.process_count = _process_info(cfg)
        if cfg.batch_size % self.process_count:
            raise ValueError(f"batch_size {cfg.batch_size} not divisible by {self.process_count} hosts")
        self.host_batch_size = cfg.batch_size // self.process_count
        self.views = _check_views(cfg)
        if cfg.pixels not in ("float32", "uint8"):
            raise ValueError(f"DataConfig.pixels must be 'float32' or 'uint8', got {cfg.pixels!r}")
        self.deterministic = cfg.deterministic or not cfg.shuffle  # reading in order needs ordered maps
        # As the original, datasets it cannot train on (joint-space actions) are skipped, with a warning.
        self.mixture, self.skipped_datasets = loadable_mixture(cfg.mixture)
        for name, why in self.skipped_datasets.items():
            log.warning("skipping dataset %r: %s", name, why)
        if not self.mixture:
            raise DataError(
                f"mixture {cfg.mixture!r} has no dataset to train on: {'; '.join(self.skipped_datasets.values())}"
            )
        self.skipped = BadDataLog()
        self.statistics: dict[str, dict] = {}
        self.statistics_cache_hit: dict[str, bool] = {}
        self.image_encodings: dict[str, str | None] = {}  # "jpeg" / "png" of each dataset's first camera
        per_dataset, weights = [], []
        for name, weight in self.mixture:
            frames, n_transitions = self._dataset(name)
            per_dataset.append(frames)
            weights.append(weight * (n_transitions if cfg.balance_weights else 1.0))
        self.sample_weights = {n: w / sum(weights) for (n, _), w in zip(self.mixture, weights)}
        self.dataset_length = _epoch_length(self.mixture, self.statistics, self.sample_weights)
        self.dataset = self._assemble(per_dataset, weights)

    # One dataset: builder, statistics, trajectories -> frames.
    def _dataset(self, name: str):
        cfg = self.cfg
        ds_cfg = get_dataset_config(name)
        if cfg.proprio and not any(k is not None for k in ds_cfg.state_keys):
            raise DataError(
                f"dataset {name!r}: proprio=True but its config has no state keys "
                f"(state_keys={list(ds_cfg.state_keys)}); it has no proprioception to feed"
            )
        builder = open_builder(name, cfg.data_dir)
        step_fields = _field_names(builder.info.features["steps"])  # pyright: ignore[reportIndexIssue, reportOptionalSubscript]
        standardize = make_standardize(
            name, ds_cfg, self.views or cfg.image_view, step_fields, pad_missing_views=cfg.pad_missing_views
        )
        stats = self._statistics(name, builder, ds_cfg, standardize)
        self.statistics[name] = stats
        first_view = self.views[0] if self.views else cfg.image_view
        self.image_encodings[name] = _image_encoding(builder, ds_cfg.image_keys.get(first_view))

        split = default_split(builder, cfg.train)
        ordered = not cfg.shuffle
        ds = TrajDataset.from_rlds(
            builder,
            split,
            shuffle=cfg.train and cfg.shuffle,
            seed=cfg.seed,
            process_index=self.process_index,
            process_count=self.process_count,
            deterministic=self.deterministic,
            num_parallel_reads=1 if ordered else cfg.num_parallel_reads,
            num_parallel_calls=cfg.num_parallel_calls,
            name=name,
        )
        if cfg.train:
            ds = ds.repeat()
        ds = ds.traj_map(standardize).filter(make_validator(name, cfg, self.skipped))
        a_stats = stats["action"]
        p_stats = _proprio_statistics(name, stats) if cfg.proprio else None
        mask = ds_cfg.action_mask
        if len(a_stats["q01"]) != len(mask):
            raise DataError(
                f"dataset {name!r}: action statistics have {len(a_stats['q01'])} dims but its "
                f"action encoding has {len(mask)} (mask {mask}); statistics of another dataset?"
            )

        def normalize(traj: dict[str, Any]) -> dict[str, Any]:
            traj = dict(traj, observation=dict(traj["observation"]))
            traj["action"] = N.normalize_tf(traj["action"], a_stats, cfg.normalization, mask=mask)
            if p_stats is not None:  # proprio is normalised only when the config loads it
                proprio = traj["observation"]["proprio"]
                check = tf.debugging.Assert(
                    tf.equal(tf.shape(proprio)[-1], len(p_stats["q01"])),
                    [
                        f"{MARK} dataset {name}, episode",
                        traj["episode"][0],
                        "bad field: proprio has",
                        tf.shape(proprio)[-1],
                        f"dims but its statistics have {len(p_stats['q01'])}",
                    ],
                )
                with tf.control_dependencies([check]):
                    traj["observation"]["proprio"] = N.normalize_tf(proprio, p_stats, cfg.normalization)
            return traj

        ds = ds.traj_map(normalize)
        if cfg.max_action is not None:
            ds = ds.filter(lambda t: tf.reduce_all(tf.abs(t["action"]) <= cfg.max_action))
        if cfg.max_proprio is not None and cfg.proprio:
            ds = ds.filter(lambda t: tf.reduce_all(tf.abs(t["observation"]["proprio"]) <= cfg.max_proprio))
        absolute = ds_cfg.absolute_action_mask  # past the end: the gripper holds, the arm stops
        ds = ds.traj_map(
            lambda t: X.chunk_act_obs(t, cfg.window_size, cfg.future_action_window_size, absolute_mask=absolute)
        )
        if cfg.train and cfg.subsample_length:
            length = cfg.subsample_length

            def sub(traj):
                seed = (
                    tf.stack([tf.cast(cfg.seed, tf.int64), traj["_traj_index"][0]])
                    if "_traj_index" in traj
                    else tf.stack([tf.constant(cfg.seed, tf.int64), traj["episode_id"][0]])
                )
                return X.subsample(traj, length, seed)

            ds = ds.traj_map(sub)
        ds = ds.traj_map(make_tokenize(name, cfg, self.tok, self.act_tok, len(mask)))
        ds = ds.traj_map(lambda t: frame_fields(t, self.views, cfg.proprio, cfg.episode_info))
        frames = ds.flatten(cycle_length=1 if ordered else 16)
        if ds_cfg.chunk_filter is not None:  # e.g. DROID's idle frames, on normalised action chunks
            frames = frames.filter(ds_cfg.chunk_filter)
        return frames, stats["num_transitions"]

    def _statistics(self, name, builder, ds_cfg, standardize) -> dict:
        cfg = self.cfg
        if cfg.dataset_statistics is not None:
            if name not in cfg.dataset_statistics:
                raise KeyError(
                    f"dataset_statistics given but has no entry for {name!r}; has {sorted(cfg.dataset_statistics)}"
                )
            return _check_given_statistics(name, cfg.dataset_statistics[name], cfg.normalization)
        stats, hit = dataset_statistics(name, builder, ds_cfg, standardize, cfg)
        self.statistics_cache_hit[name] = hit
        return stats

    def _assemble(self, per_dataset: list[TrajDataset], weights: list[float]) -> tf.data.Dataset:
        cfg = self.cfg
        frames = TrajDataset.interleave(per_dataset, weights, seed=cfg.seed, deterministic=self.deterministic)
        if cfg.train and cfg.shuffle:
            frames = frames.shuffle(cfg.shuffle_buffer, seed=cfg.seed)
        size = (cfg.image_size, cfg.image_size)
        augment = cfg.train and cfg.augment
        mean, std = tf.constant(FUSED_MEAN), tf.constant(FUSED_STD)

        def normalise(image):  # uint8 [..., S, S, 3] -> float32 [..., S, S, 6]
            x = tf.cast(image, tf.float32) / 255.0
            return (tf.concat([x, x], -1) - mean) / std

        def to_model(frame, seed):
            out = {k: v for k, v in frame.items() if not k.startswith("image")}
            if "proprio" in out:
                out["proprio"] = out["proprio"][-1]  # [W, P] -> the current frame's [P]
            if self.views is not None:  # window 1 (checked): one image per view
                seeds = tf.random.experimental.stateless_split(seed, len(self.views))  # pyright: ignore[reportAttributeAccessIssue]
                per_view = []
                for i, v in enumerate(self.views):
                    image = X.decode_image(frame[image_field(v)][0], size)
                    if augment:  # an independent seed per view; wrist cameras are not cropped
                        image = X.augment_image(image, seeds[i], crop=not v.startswith("wrist"))
                    per_view.append(image)
                out["pixel_values"] = tf.stack(per_view)
                return out
            if cfg.window_size == 1:  # OpenVLA: one image, no per-frame loop (map_fn costs a while loop)
                image = X.decode_image(frame["image"][0], size)
                if augment:
                    seeds = tf.random.experimental.stateless_split(seed, 1)  # pyright: ignore[reportAttributeAccessIssue]
                    image = X.augment_image(image, seeds[0])
                out["pixel_values"] = image
                return out
            image = tf.map_fn(
                lambda im: X.decode_image(im, size),
                frame["image"],
                fn_output_signature=tf.TensorSpec([*size, 3], tf.uint8),
            )
            if augment:  # one seed per frame, split per window image
                seeds = tf.random.experimental.stateless_split(seed, tf.shape(image)[0])  # pyright: ignore[reportAttributeAccessIssue]
                image = tf.map_fn(
                    lambda a: X.augment_image(a[0], a[1]),
                    (image, seeds),
                    fn_output_signature=tf.TensorSpec([*size, 3], tf.uint8),
                )
            out["pixel_values"] = image
            return out

        seeds = tf.data.Dataset.random(seed=cfg.seed).batch(2)
        ds = tf.data.Dataset.zip((frames.ds, seeds)).map(
            to_model, num_parallel_calls=cfg.num_parallel_calls, deterministic=self.deterministic or None
        )
        ds = ds.batch(
            self.host_batch_size,
            drop_remainder=cfg.train,
            num_parallel_calls=cfg.num_parallel_calls,
            deterministic=self.deterministic or None,
        )

        # Pixels stay uint8 through the batching copy (8x fewer bytes); a batch is normalised at once,
        # or, with pixels="uint8", by the model on the device.
        def finish(batch):
            if cfg.pixels == "uint8":
                return self._trim(batch)
            return dict(self._trim(batch), pixel_values=normalise(batch["pixel_values"]))

        ds = ds.map(
            finish,
            num_parallel_calls=cfg.num_parallel_calls,
            deterministic=self.deterministic or None,
        )
        opts = tf.data.Options()
        opts.deterministic = bool(self.deterministic)
        if cfg.ram_budget_gb:
            opts.autotune.ram_budget = int(cfg.ram_budget_gb * 1024**3)
        return ds.with_options(opts).prefetch(cfg.prefetch)

    def _trim(self, batch):
        """Cut the right padding to the batch's longest sequence, rounded up to seq_bucket."""
        full = tf.shape(batch["input_ids"])[1]
        b = self.cfg.seq_bucket
        need = tf.reduce_max(batch["seq_len"])
        length = tf.minimum(full, (need + b - 1) // b * b)
        out = {k: v for k, v in batch.items() if k != "seq_len"}
        for k in ("input_ids", "labels", "attention_mask"):
            out[k] = batch[k][:, :length]
        return out

    @property
    def inference_resize(self) -> str:
        """How a model trained on these batches should see camera frames (`models/preprocess.py`):
        "train_jpeg" when every dataset stores its frames as JPEG (a raw frame gets the same JPEG
        round trip, as OpenVLA's evaluation scripts do), else "train"."""
        encodings = set(self.image_encodings.values())
        return "train_jpeg" if encodings == {"jpeg"} else "train"

    def __iter__(self) -> Iterator[dict]:
        """NumPy batches; the iterator's position can be saved and restored (`data/iterator.py`)."""
        from openvla_jax.data.iterator import CheckpointableIterator

        return CheckpointableIterator(self)

    def as_numpy_iterator(self) -> Iterator[dict]:
        return iter(self)


def _numpy(ds: tf.data.Dataset):
    it = iter(ds)
    while True:
        try:
            yield tf.nest.map_structure(lambda x: x.numpy(), next(it))
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise as_data_error(e) from None


def dataset_statistics(name: str, builder, ds_cfg, standardize, cfg: DataConfig) -> tuple[dict, bool]:
    """(statistics, cache hit) of dataset `name` as the original computes them: every episode of every
    split, labeled or not, after standardize; proprio as loaded (`cfg.proprio`), else zeros shaped
    like the actions. Cached as JSON beside the dataset (else in ~/.cache), keyed by a hash of the
    dataset, its transform and those options."""
    key = S.statistics_hash(
        S.builder_fingerprint(builder),
        ds_cfg.describe(),
        f"proprio={cfg.proprio}|on_bad_data={cfg.on_bad_data}|every_episode",
    )
    splits = "+".join(sorted(builder.info.splits.keys()))

    def compute():
        ds = TrajDataset.from_rlds(
            builder, splits, shuffle=False, deterministic=True, num_parallel_reads=cfg.num_parallel_reads, name=name
        )
        ds = ds.traj_map(standardize).filter(make_validator(name, cfg, None, for_statistics=True))
        load_proprio = cfg.proprio
        ds = ds.traj_map(
            lambda t: {
                "action": t["action"],
                "proprio": t["observation"]["proprio"] if load_proprio else tf.zeros_like(t["action"]),
            }
        )
        total = sum(s.num_examples for s in builder.info.splits.values())
        return S.compute_statistics(_numpy(ds.ds), total=total, desc=f"statistics {name}", progress=cfg.progress)

    dirs = [cfg.statistics_dir] if cfg.statistics_dir else [builder.data_dir, S.DEFAULT_CACHE]
    stats, _, hit = S.cached_statistics(key, compute, dirs)
    stats["action"]["mask"] = list(ds_cfg.action_mask)
    return stats, hit


def compute_dataset_statistics(
    name: str,
    data_dir: str,
    proprio: bool = False,
    on_bad_data: str = "raise",
    statistics_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Statistics of dataset `name` (registered in `data/oxe`) under `data_dir`, in the original's
    `dataset_statistics.json` layout: {action: {mean, std, max, min, q01, q99, mask}, proprio: {...},
    num_transitions, num_trajectories}. Reads the cache when it holds them, else computes and caches."""
    cfg = DataConfig(
        data_dir=data_dir,
        mixture=name,
        proprio=proprio,
        on_bad_data=on_bad_data,
        statistics_dir=statistics_dir,
        progress=progress,
    )
    ds_cfg = get_dataset_config(name)
    builder = open_builder(name, data_dir)
    steps = builder.info.features["steps"]  # pyright: ignore[reportIndexIssue, reportOptionalSubscript]
    standardize = make_standardize(name, ds_cfg, cfg.image_view, _field_names(steps))
    return dataset_statistics(name, builder, ds_cfg, standardize, cfg)[0]


def _check_given_statistics(name: str, stats, normalization: str) -> dict:
    """Given statistics (a checkpoint's `norm_stats`, a `dataset_statistics.json`), checked for what
    normalising actions needs; the original's layout (with a 7-dim zero `proprio` block) is fine."""
    if not isinstance(stats, dict) or not isinstance(stats.get("action"), dict):
        raise DataError(
            f"dataset_statistics[{name!r}] has no 'action' block; expected "
            "{'action': {'q01', 'q99', 'min', 'max', 'mean', 'std', ...}, 'num_transitions', ...}"
        )
    need = {N.BOUNDS_Q99: ("q01", "q99", "min", "max"), N.BOUNDS: ("min", "max"), N.NORMAL: ("mean", "std")}
    missing = [k for k in need.get(normalization, ()) if k not in stats["action"]]
    if missing:
        raise DataError(
            f"dataset_statistics[{name!r}]['action'] lacks {missing} needed by "
            f"normalization={normalization!r}; has {sorted(stats['action'])}"
        )
    if "num_transitions" not in stats:
        raise DataError(f"dataset_statistics[{name!r}] lacks 'num_transitions' (mixture weights use it)")
    return stats


def _proprio_statistics(name: str, stats: dict) -> dict:
    p_stats = stats.get("proprio") or {}
    if not len(p_stats.get("q01", ())):
        raise DataError(
            f"dataset {name!r}: proprio=True but its statistics have no 'proprio' "
            "entry to normalise with (given dataset_statistics from an older run?)"
        )
    if not any(np.asarray(p_stats.get("max", [1.0])) != np.asarray(p_stats.get("min", [0.0]))) and not any(
        np.asarray(p_stats["q01"])
    ):
        raise DataError(
            f"dataset {name!r}: proprio=True but its proprio statistics are all zeros (the "
            "placeholder block of statistics computed without proprio); recompute them "
            "with proprio=True"
        )
    return p_stats


def _epoch_length(mixture, statistics: dict, sample_weights: dict) -> int:
    """Frames until every primary dataset (mixture weight 1.0) has been seen once, as the original's
    `dataset_len` (all datasets when none has weight 1.0)."""
    primary = [n for n, w in mixture if w == 1.0] or [n for n, _ in mixture]
    return int(max(statistics[n]["num_transitions"] / sample_weights[n] for n in primary))


def _image_encoding(builder, key: str | None) -> str | None:
    """The stored encoding ("jpeg", "png") of the raw image field `key`, None when unknown."""
    try:
        feature = builder.info.features["steps"]["observation"][key]
    except (KeyError, TypeError):
        return None
    fmt = getattr(feature, "encoding_format", None)
    return fmt if fmt is not None else ("png" if hasattr(feature, "encoding_format") else None)


def _field_names(features, prefix="") -> list[str]:
    names = []
    for k, v in features.items():
        if hasattr(v, "items") and not hasattr(v, "feature"):
            names += _field_names(v, f"{prefix}{k}/")
        else:
            names.append(prefix + k)
    return names


def make_pipeline(cfg: DataConfig, tokenizer: TextTokenizer, action_tokenizer=None) -> RLDSPipeline:
    return RLDSPipeline(cfg, tokenizer, action_tokenizer)
