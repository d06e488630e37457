"""Write episodes to disk as a genuine RLDS tfds dataset.

The result is a prepared tfds directory (``dataset_info.json``, ``features.json``, tfrecord
shards) at ``{data_dir}/{name}/{version}`` that reads back offline with
``tfds.builder_from_directory(path)`` or ``tfds.builder(name, data_dir=data_dir)``, exactly like
the released Open X-Embodiment datasets. Images are stored encoded (PNG or JPEG), as real RLDS
datasets store them, so readers exercise the same decode path.

An episode is a nested dict in the RLDS layout; every leaf under ``"steps"`` is stacked over time::

    {
      "steps": {
        "observation": {"image": uint8 [T, H, W, 3], "state": float32 [T, D]},
        "action": float32 [T, 7],
        "language_instruction": list[str] of length T (or one str, repeated for every step),
        "is_first": bool [T], "is_last": bool [T], "is_terminal": bool [T],
        "reward": float32 [T], "discount": float32 [T],
      },
      "episode_metadata": {"file_path": str, "episode_id": int, ...},   # optional
    }

Any nesting and any keys are allowed (that is how each OXE dataset differs). Feature types are
inferred from the first episode (``infer_features``) unless given explicitly. Usage::

    path = write_rlds("/tmp/data", "my_robot", {"train": train_eps, "val": val_eps})
    builder = tfds.builder_from_directory(path)
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

Episode = Mapping[str, Any]

__all__ = ["infer_features", "write_rlds", "episode_length"]


def _is_text(x: Any) -> bool:
    return isinstance(x, (str, bytes))


def _is_text_seq(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO" and x.ndim == 1
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_text(v) for v in x)


def episode_length(episode: Episode) -> int:
    """Number of steps T of an episode: the leading dim of its first non-text step leaf."""

    def first_len(tree: Any) -> int | None:
        if isinstance(tree, Mapping):
            for v in tree.values():
                n = first_len(v)
                if n is not None:
                    return n
            return None
        if _is_text(tree):
            return None
        return len(tree)

    n = first_len(episode["steps"])
    if n is None:
        raise ValueError("episode['steps'] holds no array leaf to take the episode length from")
    return n


def _step_feature(value: Any, path: str, image_format: str) -> tfds.features.FeatureConnector:
    """Feature for one stacked step leaf (leading time axis removed)."""
    if _is_text(value) or _is_text_seq(value):
        return tfds.features.Text()
    arr = np.asarray(value)
    if arr.ndim == 0:
        raise ValueError(f"step field {path!r} is a scalar; expected an array stacked over time [T, ...]")
    shape = arr.shape[1:]
    if arr.dtype == np.uint8 and len(shape) == 3 and shape[-1] in (1, 3, 4):
        return tfds.features.Image(shape=shape, encoding_format=image_format)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"step field {path!r} has unsupported dtype {arr.dtype}")
    if not shape:
        return tfds.features.Scalar(dtype=arr.dtype)
    return tfds.features.Tensor(shape=shape, dtype=arr.dtype)


def _meta_feature(value: Any, path: str) -> tfds.features.FeatureConnector:
    """Feature for one per-episode metadata leaf."""
    if _is_text(value):
        return tfds.features.Text()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"episode_metadata field {path!r} has unsupported dtype {arr.dtype}")
    if arr.dtype == np.int64 and isinstance(value, int):
        arr = arr.astype(np.int64)
    if arr.ndim == 0:
        return tfds.features.Scalar(dtype=arr.dtype)
    return tfds.features.Tensor(shape=arr.shape, dtype=arr.dtype)


def _map_tree(tree: Mapping[str, Any], fn, prefix: str) -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}"
        out[k] = _map_tree(v, fn, path) if isinstance(v, Mapping) else fn(v, path)
    return out


def infer_features(episode: Episode, image_format: str = "png") -> tfds.features.FeaturesDict:
    """Infer the tfds feature spec of an RLDS episode.

    Rules for a step leaf stacked over time ``[T, ...]``: uint8 ``[T, H, W, C]`` with C in
    {1, 3, 4} -> ``Image`` (encoded as ``image_format``); str (or list of T str) -> ``Text``;
    numeric ``[T]`` -> ``Scalar``; numeric ``[T, ...]`` -> ``Tensor`` of that dtype. Metadata leaves:
    str -> ``Text``, numeric -> ``Scalar``/``Tensor``. Python ints are stored as int64.
    """
    if "steps" not in episode:
        raise ValueError(f"an RLDS episode needs a 'steps' dict; got keys {sorted(episode)}")
    spec: dict[str, Any] = {
        "steps": tfds.features.Dataset(
            _map_tree(episode["steps"], lambda v, p: _step_feature(v, p, image_format), "steps")
        )
    }
    if "episode_metadata" in episode:
        spec["episode_metadata"] = _map_tree(episode["episode_metadata"], _meta_feature, "episode_metadata")
    return tfds.features.FeaturesDict(spec)


def _as_features(features: Any) -> tfds.features.FeaturesDict:
    """Accept a FeaturesDict or a plain nested dict of connectors (``steps`` wrapped as Dataset)."""
    if isinstance(features, tfds.features.FeaturesDict):
        return features
    if not isinstance(features, Mapping) or "steps" not in features:
        raise ValueError("features must be a tfds FeaturesDict or a dict with a 'steps' entry")
    spec = dict(features)
    if isinstance(spec["steps"], Mapping):
        spec["steps"] = tfds.features.Dataset(spec["steps"])
    return tfds.features.FeaturesDict(spec)


def _prepare_episode(episode: Episode, where: str) -> dict:
    """Check step lengths agree and broadcast a single instruction string over all steps."""
    if "steps" not in episode:
        raise ValueError(f"{where}: missing 'steps'")
    t = episode_length(episode)
    if t == 0:
        raise ValueError(f"{where}: episode has no steps")

    def fix(v: Any, path: str) -> Any:
        if _is_text(v):
            return [v] * t
        if len(v) != t:
            raise ValueError(
                f"{where}: step field {path!r} has length {len(v)}, expected T={t} "
                "(all step fields must be stacked over the same steps)"
            )
        return list(v) if _is_text_seq(v) else np.asarray(v)

    out = dict(episode)
    out["steps"] = _map_tree(episode["steps"], fix, "steps")
    return out


def _keyed(split: str, episodes: Iterable[Episode]) -> Iterator[tuple[str, dict]]:
    for i, ep in enumerate(episodes):
        yield f"{split}_{i:07d}", _prepare_episode(ep, f"split {split!r} episode {i}")


class _Builder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
    """AdhocBuilder without a source-code path.

    tfds 4.9.10 resolves ``code_path`` (to look for a checksums file) through the optional
    ``importlib_resources`` package, which is not installed here; an ad-hoc builder has no
    checksums, so there is nothing to find.
    """

    code_path = None


def write_rlds(
    data_dir: str,
    name: str,
    episodes: Mapping[str, Iterable[Episode]] | Iterable[Episode],
    *,
    features: Any = None,
    val_episodes: int = 0,
    version: str = "1.0.0",
    image_format: str = "png",
    description: str | None = None,
    disable_shuffling: bool = True,
) -> str:
    """Write episodes as a prepared RLDS tfds dataset; returns ``{data_dir}/{name}/{version}``.

    Args:
      data_dir: root directory (any path tf.io can write; created if missing).
      name: dataset name (also the tfrecord file prefix, ``{name}-{split}.tfrecord-*``).
      episodes: either ``{split_name: iterable of episodes}`` (e.g. ``{"train": ..., "val": ...}``)
        or one iterable of episodes, split by ``val_episodes``.
      features: a ``tfds.features.FeaturesDict``, or a nested dict of feature connectors with a
        ``steps`` dict (wrapped as ``tfds.features.Dataset``); None infers it from the first episode
        (``infer_features``).
      val_episodes: with a plain iterable, the LAST ``val_episodes`` episodes form split ``val``
        (the iterable is materialized); the rest form ``train``.
      version: tfds version string.
      image_format: "png" (lossless) or "jpeg" (as most OXE datasets) for inferred Image features.
      description: free text stored in dataset_info.json.
      disable_shuffling: keep episodes in the given order on disk (True), as fixtures expect.
    Raises:
      FileExistsError: the dataset version directory already exists.
      ValueError: an episode is malformed (message names split, episode and field).
    """
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if isinstance(episodes, Mapping):
        splits = {str(k): iter(v) for k, v in episodes.items()}
    else:
        if val_episodes < 0:
            raise ValueError(f"val_episodes must be >= 0, got {val_episodes}")
        if val_episodes:
            eps = list(episodes)
            if val_episodes >= len(eps):
                raise ValueError(f"val_episodes={val_episodes} leaves no train episodes out of {len(eps)}")
            splits = {"train": iter(eps[:-val_episodes]), "val": iter(eps[-val_episodes:])}
        else:
            splits = {"train": iter(episodes)}
    if not splits:
        raise ValueError("no splits given")

    if features is None:
        # Peek at the first episode of the first split to infer the spec, then put it back.
        first_split = next(iter(splits))
        try:
            first = next(splits[first_split])
        except StopIteration:
            raise ValueError(f"split {first_split!r} is empty; cannot infer features") from None
        splits[first_split] = itertools.chain([first], splits[first_split])
        feats = infer_features(_prepare_episode(first, f"split {first_split!r} episode 0"), image_format)
    else:
        feats = _as_features(features)

    builder = _Builder(
        name=name,
        version=version,
        features=feats,
        split_datasets={s: _keyed(s, it) for s, it in splits.items()},
        data_dir=data_dir,
        description=description or f"RLDS dataset {name} written by openvla_jax.",
        disable_shuffling=disable_shuffling,
    )
    if builder.is_prepared():
        raise FileExistsError(f"dataset {name}:{version} already exists in {builder.data_dir}")
    # tfds writes into an incomplete_* temp dir and renames, so a crash leaves nothing half-written.
    # Nothing is downloaded; a throwaway download_dir keeps tfds from leaving `downloads/` behind.
    with tempfile.TemporaryDirectory() as tmp:
        builder.download_and_prepare(
            download_dir=tmp, download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return str(builder.data_dir)
