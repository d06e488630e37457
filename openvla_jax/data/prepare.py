"""Per-trajectory preparation for the RLDS pipeline: standardize, validate, tokenize.

Each factory returns a function for `TrajDataset.traj_map` / `filter` over one trajectory (all
fields `[T, ...]`). Problems in the data raise `DataError` naming the dataset, the episode and the
field, or are skipped and counted in a `BadDataLog` (`DataConfig.on_bad_data`, `skip_unlabeled`).
"""

from __future__ import annotations

import collections
import threading
from typing import Sequence

import numpy as np
import tensorflow as tf

from openvla_jax.data import transforms as X
from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.tokenizer.prompt import IGNORE_INDEX, prompt_prefix_ids
from openvla_jax.tokenizer.text import TextTokenizer

MARK = "openvla_jax.data:"


class DataError(ValueError):
    """Bad input data; the message names the dataset, the episode and the field."""


def as_data_error(e: Exception) -> Exception:
    """A tf.data error raised by one of our checks (its message holds MARK) -> that DataError; others as they are."""
    msg = getattr(e, "message", str(e))
    if MARK not in msg:
        return e
    text = msg[msg.index(MARK) :].split("\n")[0]
    for junk in ("[", "]", "b'", "\\", "'"):
        text = text.replace(junk, "")
    return DataError(text)


# Why an episode is skipped: the field `make_validator` names first in its problem text.
SKIP_REASONS = ("steps", "action", "language_instruction")


class BadDataLog:
    """Thread-safe count of skipped episodes by (dataset, field), with a few examples.

    Each episode counts once, however many passes over the data meet it again (training repeats
    the data): `counts` is how many distinct episodes were skipped, not how many times."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.examples: list[tuple[str, str, str]] = []
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def record(self, dataset, episode, field, episode_index=-1) -> np.bool_:
        """episode_index: the episode's index in its split (`traj.py`'s `_episode_id`), the same on
        every pass; -1 when unknown, then `episode` (its file path or id) tells episodes apart. An
        episode standardize left without steps has neither ("?"): such are counted at every pass."""
        d, e, f = (x.decode() if isinstance(x, bytes) else str(x) for x in (dataset, episode, field))
        key = (d, f"#{int(episode_index)}" if int(episode_index) >= 0 else e, f)
        with self._lock:
            if key not in self._seen or e == "?":
                self._seen.add(key)
                self.counts[(d, f)] += 1
                if len(self.examples) < 100:
                    self.examples.append((d, e, f))
        return np.bool_(False)

    def total(self) -> int:
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, dict[str, int]]:
        """{dataset: {reason: episodes}}, reasons from `SKIP_REASONS` (the field the problem names)."""
        with self._lock:
            items = list(self.counts.items())
        out: dict[str, dict[str, int]] = {}
        for (d, f), n in sorted(items):
            reason = f.split(" ", 1)[0]
            out.setdefault(d, {})
            out[d][reason] = out[d].get(reason, 0) + n
        return out


# --- per-trajectory steps ------------------------------------------------------------------------


def _episode_ids(traj: dict) -> tf.Tensor:
    meta = traj.get("traj_metadata", {})
    if "file_path" in meta:
        return tf.strings.as_string(meta["file_path"]) if meta["file_path"].dtype != tf.string else meta["file_path"]
    if "episode_id" in meta:
        return tf.strings.as_string(meta["episode_id"])
    return tf.strings.join(["#", tf.strings.as_string(traj["_traj_index"])])


def image_field(view: str) -> str:
    """Observation / frame field holding the encoded images of camera `view` when several are read."""
    return f"image_{view}"


def make_standardize(
    name: str, ds_cfg, view: str | Sequence[str], step_fields: Sequence[str], pad_missing_views: bool = False
):
    """Raw RLDS trajectory -> {observation: {image, proprio}, task, action, dataset_name, episode}.

    `view` a string: one camera, `observation.image` (today's OpenVLA batches; a camera the dataset
    config lacks is an empty string, decoded as a black image). `view` a sequence of camera names:
    `observation.image_<view>` for each; a camera the dataset config has no key for raises
    DataError naming dataset and view, unless `pad_missing_views` (Octo's convention for mixtures:
    the missing camera becomes a black image).
    """
    views = (view,) if isinstance(view, str) else tuple(view)
    if not isinstance(view, str) and not pad_missing_views:
        missing = [v for v in views if not ds_cfg.image_keys.get(v)]
        if missing:
            have = sorted(k for k, v in ds_cfg.image_keys.items() if v)
            raise DataError(
                f"dataset {name!r} has no camera for image view(s) {missing}; its config "
                f"names {have}. Drop the view, or set pad_missing_views=True for black images"
            )

    @tf.autograph.experimental.do_not_convert  # let DataError reach the caller unwrapped
    def fn(traj):
        episode = _episode_ids(traj)
        try:
            out = ds_cfg.standardize(dict(traj, observation=dict(traj["observation"])))
            obs = out["observation"]
            t_len = tf.shape(out["action"])[0]
            images = {}
            for v in views:
                key = ds_cfg.image_keys.get(v)
                images[v] = (key, obs[key] if key else tf.fill([t_len], ""))
            proprio = [
                tf.zeros([t_len, 1]) if k is None else tf.reshape(tf.cast(obs[k], tf.float32), [t_len, -1])
                for k in ds_cfg.state_keys
            ]
            lang = out[ds_cfg.language_key] if ds_cfg.language_key in out else out["language_instruction"]
        except KeyError as e:
            raise DataError(
                f"{MARK} dataset {name!r}: field {e.args[0]!r} is missing (every episode); "
                f"step fields are {sorted(step_fields)}"
            ) from None
        for key, image in images.values():
            if image.dtype not in (tf.string, tf.uint8):
                raise DataError(
                    f"{MARK} dataset {name!r}: image field {key!r} has dtype {image.dtype.name} "
                    "(every episode); expected encoded bytes or uint8 [H, W, 3]"
                )
        action = out["action"]
        if not action.dtype.is_floating and not action.dtype.is_integer:
            raise DataError(f"{MARK} dataset {name!r}: field 'action' has dtype {action.dtype.name}")
        if isinstance(view, str):
            observation = {"image": images[view][1]}
        else:
            observation = {image_field(v): images[v][1] for v in views}
        observation["proprio"] = tf.concat(proprio, -1) if proprio else tf.zeros([t_len, 0])
        # Standardize may drop steps (bridge drops the first and last): cut the episode ids to match.
        episode_id = traj["_episode_id"][:1] if "_episode_id" in traj else tf.constant([-1], tf.int64)
        return {
            "observation": observation,
            "task": {"language_instruction": tf.reshape(lang, [t_len])},
            "action": tf.cast(action, tf.float32),
            "dataset_name": tf.fill([t_len], name),
            "episode": tf.repeat(episode[:1], t_len),
            "episode_id": tf.repeat(episode_id, t_len),
            "timestep": tf.range(t_len, dtype=tf.int32),
        }

    return fn


def make_validator(name: str, cfg, log: BadDataLog | None, for_statistics: bool = False):
    """Filter predicate: problems found in a trajectory raise (naming dataset, episode, field) or are
    skipped and counted, per `cfg.on_bad_data`; unlabeled episodes are skipped when skip_unlabeled.

    for_statistics: only non-finite actions are problems; empty and unlabeled episodes stay (the
    original computes statistics over every episode, before its unlabeled filter)."""

    def problem(traj):
        # tf.logical_not: what `~` runs on a bool tensor (the tf stubs lack Tensor.__invert__)
        nonfinite = tf.logical_not(tf.reduce_all(tf.math.is_finite(traj["action"])))
        if for_statistics:
            return tf.where(nonfinite, "action (NaN or inf)", "")
        labeled = X.is_labeled(traj) if cfg.skip_unlabeled else tf.constant(True)
        nonempty = tf.shape(traj["action"])[0] > 0
        return tf.where(
            tf.logical_not(nonempty),
            "steps (no steps left after standardize)",
            tf.where(
                nonfinite,
                "action (NaN or inf)",
                tf.where(tf.logical_not(labeled), "language_instruction (empty in every step)", ""),
            ),
        )

    def keep(traj):
        p = problem(traj)
        ep = tf.cond(tf.size(traj["episode"]) > 0, lambda: traj["episode"][0], lambda: tf.constant("?"))
        ok = tf.equal(p, "")
        # Empty episodes and (with skip_unlabeled) unlabeled ones are always skipped, never raised.
        skip_it = tf.logical_or(
            tf.constant(cfg.on_bad_data == "skip"), tf.strings.regex_full_match(p, "(steps|language_instruction).*")
        )
        if log is None:
            record = lambda: tf.constant(False)  # noqa: E731
        else:
            log_record = log.record
            none = tf.constant(-1, tf.int64)  # fields are per step: an episode left empty has no index
            ids = traj.get("episode_id", tf.zeros([0], tf.int64))
            index = tf.cond(tf.size(ids) > 0, lambda: tf.cast(ids[0], tf.int64), lambda: none)
            record = lambda: tf.numpy_function(log_record, [name, ep, p, index], tf.bool, stateful=True)  # noqa: E731
        assert_ok = tf.debugging.Assert(
            tf.logical_or(ok, skip_it), [f"{MARK} dataset {name}, episode", ep, "bad field:", p]
        )
        with tf.control_dependencies([assert_ok]):
            return tf.cond(ok, lambda: tf.constant(True), lambda: tf.reshape(record(), []))

    if cfg.on_bad_data not in ("raise", "skip"):
        raise ValueError(f"on_bad_data must be 'raise' or 'skip', got {cfg.on_bad_data!r}")
    return keep


def make_tokenize(name: str, cfg, tok: TextTokenizer, act_tok: ActionTokenizer, action_dim: int = 7):
    """Trajectory -> adds input_ids / labels / attention_mask `[T, L]`, L = max_prompt_len + K*A + 1.

    The instruction is tokenized in one Python call per trajectory (cached by string); action ids
    and the sequence layout are vectorised TF ops.
    """
    cache: dict[bytes, list[int]] = {}
    P = cfg.max_prompt_len

    def encode(instructions, episode):
        out = np.full((len(instructions), P), tok.pad_id, np.int32)
        lens = np.zeros(len(instructions), np.int32)
        for i, s in enumerate(instructions):
            ids = cache.get(s)
            if ids is None:
                ids = cache[s] = prompt_prefix_ids(tok, s.decode("utf-8"))
            if len(ids) > P:
                raise DataError(
                    f"{MARK} dataset {name!r}, episode {episode.decode()}: "
                    f"language_instruction is {len(ids)} prompt tokens, over max_prompt_len={P}"
                )
            out[i, : len(ids)] = ids
            lens[i] = len(ids)
        return out, lens

    def fn(traj):
        ep = traj["episode"][0]
        prefix, n = tf.numpy_function(
            encode, [traj["task"]["language_instruction"], ep], [tf.int32, tf.int32], stateful=False
        )
        t_len = tf.shape(traj["action"])[0]
        prefix = tf.reshape(prefix, [t_len, P])
        n = tf.reshape(n, [t_len, 1])
        act = traj["action"][:, cfg.window_size - 1 :]  # the supervised chunk [T, 1+F, A]
        k = (1 + cfg.future_action_window_size) * action_dim
        act_ids = tf.reshape(act_tok.encode_tf(act), [t_len, k])  # [T, K]
        L = P + k + 1
        j = tf.range(L)[None]
        prefix = tf.pad(prefix, [[0, 0], [0, L - P]], constant_values=tok.pad_id)
        act_at = tf.gather(act_ids, tf.clip_by_value(j - n, 0, k - 1), batch_dims=1)
        ids = tf.where(j < n, prefix, tf.where(j < n + k, act_at, tf.where(j == n + k, tok.eos_id, tok.pad_id)))
        supervised = (j >= n) & (j <= n + k)
        traj = dict(traj)
        traj["input_ids"] = ids
        traj["labels"] = tf.where(supervised, ids, IGNORE_INDEX)
        traj["attention_mask"] = j <= n + k
        traj["seq_len"] = tf.reshape(n + k + 1, [t_len])
        return traj

    return fn


def frame_fields(traj, views: Sequence[str] | None = None, proprio: bool = False, episode_info: bool = False):
    """The fields a frame keeps after flattening (images still encoded).

    views None: `image` (one camera); else `image_<view>` per camera. proprio: `proprio [W, P]`
    (normalised; the pipeline keeps the window's last frame). episode_info: `episode_id` int64 (the
    episode's index in its split, in the dataset's order) and `timestep` int32 (the frame's index in
    the standardized episode).
    """
    obs = traj["observation"]
    out = {"image": obs["image"]} if views is None else {image_field(v): obs[image_field(v)] for v in views}
    if proprio:
        out["proprio"] = obs["proprio"]
    if episode_info:
        out["episode_id"], out["timestep"] = traj["episode_id"], traj["timestep"]
    out.update(
        {
            "input_ids": traj["input_ids"],
            "labels": traj["labels"],
            "attention_mask": traj["attention_mask"],
            "seq_len": traj["seq_len"],
            "action": traj["action"],
            "dataset_name": traj["dataset_name"],
        }
    )
    return out
