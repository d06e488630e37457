"""Offline evaluation: greedy action tokens over a held-out RLDS split, in jitted batches.

    from openvla_jax import OpenVLA
    from openvla_jax.data.rlds import DataConfig
    vla = OpenVLA.load("workdir/export", dtype="float32")
    results = evaluate_offline(vla, DataConfig(data_dir="data/demo", mixture="demo_tabletop", batch_size=32))
    results["metrics"]["overall"]["action_accuracy"]

Per batch of the validation split (`DataConfig(train=False)`, every frame once, no augmentation):
the prompt of each row is `input_ids` up to its first supervised label (BOS .. "▁"), the 7 action
tokens are decoded greedily by OpenVLA's bucketed decoder (one compile per (batch, length) bucket),
and compared with the labels. Metrics (`action_metrics`, pure NumPy):

    action_accuracy   mean(pred_id == label_id) over the A action tokens of every frame
    l1, mse           |pred - gt|, (pred - gt)^2 of normalised actions: pred = bin center of the
                      predicted id, gt = the dataset's normalised (continuous, not binned) action
    l1_unnorm, ...    the same after `data.normalize.unnormalize` with the dataset's statistics
                      (gt is un-normalised from its normalised value, so dims clipped to [q01, q99]
                      by normalisation stay clipped)

each overall (all frames pooled; the un-normalised numbers then mix the datasets' units), per
action dimension (`per_dim`) and per dataset (`per_dataset`), with frame and token counts.

Episode traces for the report are read separately (same standardize / normalise / tokenize /
decode steps as `RLDSPipeline`, no shuffling) because the evaluation batches interleave 16 episodes
at a time and carry no episode id.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from openvla_jax.data import normalize as N
from openvla_jax.models.config import as_config
from openvla_jax.tokenizer.prompt import IGNORE_INDEX

# pixel_values float32 [B, S, S, 6] (pipeline layout), prompt rows (B lists of ids) -> ids [B, A]
Predictor = Callable[[np.ndarray, list], np.ndarray]
METRICS = ("action_accuracy", "l1", "mse", "l1_unnorm", "mse_unnorm")


# --- metrics (pure NumPy) ------------------------------------------------------------------------


def action_sums(pred_ids, label_ids, pred_norm, gt_norm, stats: Mapping, normalization: str = N.BOUNDS_Q99) -> dict:
    """Per-dimension sums for frames of ONE dataset. ids `[N, A]`, actions `[N, A]`; `stats` that
    dataset's action statistics (q01/q99/min/max/mean/std, mask). Returns {frames, correct, abs,
    sq, abs_unnorm, sq_unnorm}, each of the last five float64 `[A]`."""
    pred_ids, label_ids = np.asarray(pred_ids), np.asarray(label_ids)
    pred_norm, gt_norm = np.asarray(pred_norm, np.float64), np.asarray(gt_norm, np.float64)
    if not (pred_ids.shape == label_ids.shape == pred_norm.shape == gt_norm.shape) or pred_ids.ndim != 2:
        raise ValueError(
            f"expected four [N, A] arrays, got pred_ids {pred_ids.shape}, label_ids "
            f"{label_ids.shape}, pred_norm {pred_norm.shape}, gt_norm {gt_norm.shape}"
        )
    d = pred_norm - gt_norm
    du = N.unnormalize(pred_norm, stats, normalization) - N.unnormalize(gt_norm, stats, normalization)
    return {
        "frames": int(pred_ids.shape[0]),
        "correct": (pred_ids == label_ids).sum(0).astype(np.float64),
        "abs": np.abs(d).sum(0),
        "sq": (d * d).sum(0),
        "abs_unnorm": np.abs(du).sum(0),
        "sq_unnorm": (du * du).sum(0),
    }


def add_sums(a: Optional[dict], b: dict) -> dict:
    if a is None:
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in b.items()}
    return {k: a[k] + b[k] for k in a}


def finalize(sums: dict) -> dict:
    """Sums -> {metric: float, "per_dim": {metric: [A]}, "frames", "tokens"}."""
    n = max(sums["frames"], 1)
    per_dim = {
        "action_accuracy": sums["correct"] / n,
        "l1": sums["abs"] / n,
        "mse": sums["sq"] / n,
        "l1_unnorm": sums["abs_unnorm"] / n,
        "mse_unnorm": sums["sq_unnorm"] / n,
    }
    out: dict[str, Any] = {k: float(v.mean()) for k, v in per_dim.items()}
    out["per_dim"] = {k: [float(x) for x in v] for k, v in per_dim.items()}
    out["frames"] = sums["frames"]
    out["tokens"] = sums["frames"] * len(sums["correct"])
    return out


def metrics_from_sums(per_dataset_sums: Mapping[str, dict]) -> dict:
    """{dataset: sums} -> {"overall": ..., "per_dataset": {dataset: ...}} (overall pools frames)."""
    total = None
    for s in per_dataset_sums.values():
        total = add_sums(total, s)
    if total is None:
        raise ValueError("no frames were evaluated (empty split, or max_batches=0)")
    return {
        "overall": finalize(total),
        "per_dataset": {name: finalize(s) for name, s in sorted(per_dataset_sums.items())},
    }


def action_metrics(
    pred_ids,
    label_ids,
    pred_norm,
    gt_norm,
    stats: Mapping,
    dataset_names: Optional[Sequence[str]] = None,
    normalization: str = N.BOUNDS_Q99,
) -> dict:
    """Metrics of frames `[N, A]`. `stats`: one dataset's action statistics when `dataset_names` is
    None, else {dataset: action statistics} and `dataset_names` names each frame's dataset."""
    if dataset_names is None:
        return metrics_from_sums({"": action_sums(pred_ids, label_ids, pred_norm, gt_norm, stats, normalization)})[
            "overall"
        ]
    names = np.asarray(dataset_names).astype(str)
    arrays = [np.asarray(x) for x in (pred_ids, label_ids, pred_norm, gt_norm)]
    sums = {}
    for name in sorted(set(names.tolist())):
        if name not in stats:
            raise KeyError(f"no statistics for dataset {name!r}; have {sorted(stats)}")
        m = names == name
        pred, label, pred_n, gt_n = (x[m] for x in arrays)
        sums[name] = action_sums(pred, label, pred_n, gt_n, stats[name], normalization)
    return metrics_from_sums(sums)


# --- batches -> prompts, labels ------------------------------------------------------------------


def split_batch(input_ids, labels, action_dim: int) -> tuple[list, np.ndarray]:
    """input_ids / labels `[B, L]` -> (prompt rows: B lists of ids before the first supervised
    position, label action ids `[B, action_dim]`)."""
    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    supervised = labels != IGNORE_INDEX
    if not supervised.any(1).all():
        bad = np.nonzero(~supervised.any(1))[0].tolist()
        raise ValueError(f"rows {bad} have no supervised label: expected 7 action tokens + EOS per row")
    first = supervised.argmax(1)
    if (first + action_dim > labels.shape[1]).any():
        raise ValueError(f"labels of length {labels.shape[1]} hold fewer than {action_dim} action tokens")
    rows = [input_ids[i, :n].tolist() for i, n in enumerate(first)]
    label_ids = np.stack([labels[i, n : n + action_dim] for i, n in enumerate(first)])
    return rows, label_ids


def _predictor(vla, predict_fn: Optional[Predictor]) -> Predictor:
    if predict_fn is not None:
        return predict_fn
    return vla.decode_rows  # OpenVLA's bucketed, jitted greedy decoder (pixels already NHWC)


def eval_data_config(vla, data_cfg):
    """The validation-split config for `vla`: its image size and (when they cover the mixture) its
    dataset statistics, so actions are normalised exactly as in training."""
    from openvla_jax.data.oxe import get_mixture

    if data_cfg.window_size != 1 or data_cfg.future_action_window_size != 0:
        raise ValueError(
            "offline evaluation predicts one action per frame (OpenVLA): needs window_size=1, "
            f"future_action_window_size=0; got {data_cfg.window_size}, "
            f"{data_cfg.future_action_window_size}"
        )
    names = [n for n, _ in get_mixture(data_cfg.mixture)]
    stats = data_cfg.dataset_statistics
    if stats is None and vla.norm_stats and all(n in vla.norm_stats for n in names):
        stats = vla.norm_stats
    return dataclasses.replace(
        data_cfg,
        train=False,
        augment=False,
        image_size=as_config(vla.config).vision.image_size,
        dataset_statistics=stats,
    )


# --- evaluation ----------------------------------------------------------------------------------


def evaluate_offline(
    vla,
    data_cfg,
    max_batches: Optional[int] = None,
    episodes_to_plot: int = 3,
    predict_fn: Optional[Predictor] = None,
    tokenizer=None,
) -> dict:
    """Evaluate `vla` (an `OpenVLA`) on the validation split of `data_cfg`'s mixture.

    predict_fn: replaces the model (tests); default `vla.decode_rows`. tokenizer: the text
    tokenizer the data was built with (default: the checkpoint's). Returns
    {"metrics": {"overall", "per_dataset"}, "episodes": [...], "batches", "frames", "seconds",
     "frames_per_second", "mixture", "split", "normalization"}; each episode is {"dataset",
     "instruction", "pred_norm", "gt_norm", "pred", "gt"} (`[T, A]` lists; pred/gt un-normalised).
    """
    from openvla_jax.data.rlds import RLDSPipeline
    from openvla_jax.models.vla import oft_options

    oft = oft_options(vla.config)
    if oft:
        raise ValueError(
            f"offline evaluation decodes OpenVLA's one-action token rows; this model has the OFT "
            f"options {oft}: use the loop's teacher-forced eval "
            "(train.eval_every; loss / L1 over the whole chunk) or evaluate/closed_loop.py"
        )
    cfg = eval_data_config(vla, data_cfg)
    tok = tokenizer if tokenizer is not None else vla.tokenizer
    act_tok = vla.action_tokenizer
    a_dim = vla.action_dim
    predict = _predictor(vla, predict_fn)
    pipeline = RLDSPipeline(cfg, tok, act_tok)
    stats = {name: pipeline.statistics[name]["action"] for name, _ in pipeline.mixture}
    masks = {name: _action_mask(name, s) for name, s in stats.items()}

    t0 = time.perf_counter()
    sums: dict[str, dict] = {}
    n_batches = 0
    for batch in pipeline:
        if max_batches is not None and n_batches >= max_batches:
            break
        rows, label_ids = split_batch(batch["input_ids"], batch["labels"], a_dim)
        pred_ids = np.asarray(predict(batch["pixel_values"], rows))[:, :a_dim]
        pred_norm = act_tok.decode(pred_ids)
        gt_norm = np.asarray(batch["action"])[:, cfg.window_size - 1, :a_dim]
        names = np.asarray(batch["dataset_name"]).astype(str)
        for name in np.unique(names):
            m = names == name
            s = action_sums(
                pred_ids[m],
                label_ids[m],
                pred_norm[m],
                gt_norm[m],
                dict(stats[name], mask=masks[name]),
                cfg.normalization,
            )
            sums[name] = add_sums(sums.get(name), s)
        n_batches += 1
    seconds = time.perf_counter() - t0
    metrics = metrics_from_sums(sums)
    episodes = read_episodes(cfg, tok, act_tok, stats, episodes_to_plot) if episodes_to_plot else []
    for ep in episodes:
        ids = _predict_frames(predict, ep.pop("pixel_values"), ep.pop("rows"), cfg.batch_size)[:, :a_dim]
        st = dict(stats[ep["dataset"]], mask=masks[ep["dataset"]])
        pred_norm = act_tok.decode(ids).astype(np.float64)
        ep.update(
            pred_norm=pred_norm.tolist(),
            pred=N.unnormalize(pred_norm, st, cfg.normalization).tolist(),
            gt=N.unnormalize(np.asarray(ep["gt_norm"]), st, cfg.normalization).tolist(),
            accuracy=float((ids == np.asarray(ep.pop("label_ids"))).mean()),
        )
    frames = metrics["overall"]["frames"]
    return {
        "metrics": metrics,
        "episodes": episodes,
        "batches": n_batches,
        "frames": frames,
        "seconds": seconds,
        "frames_per_second": frames / seconds if seconds > 0 else 0.0,
        "mixture": [[n, float(w)] for n, w in pipeline.mixture],
        "split": "validation",
        "normalization": cfg.normalization,
    }


def _action_mask(name: str, stats: Mapping) -> list:
    """The mask normalisation used: the dataset config's (statistics files may lack it)."""
    from openvla_jax.data.oxe import get_dataset_config

    return list(get_dataset_config(name).action_mask) if stats.get("mask") is None else list(stats["mask"])


def _predict_frames(predict: Predictor, pixel_values: np.ndarray, rows: list, batch_size: int) -> np.ndarray:
    out = [
        np.asarray(predict(pixel_values[i : i + batch_size], rows[i : i + batch_size]))
        for i in range(0, len(rows), batch_size)
    ]
    return np.concatenate(out)


# --- whole episodes for the report ---------------------------------------------------------------


def read_episodes(cfg, tok, act_tok, stats: Mapping[str, Mapping], n: int) -> list[dict]:
    """The first `n` validation episodes, taken round-robin over the mixture's datasets, each as
    {"dataset", "instruction", "pixel_values" [T,S,S,6], "rows", "label_ids" [T,A], "gt_norm" [T,A]}.

    The steps mirror `RLDSPipeline._dataset` and its frame decoding for window 1 (not shared code:
    the pipeline flattens episodes into an interleave with no episode id)."""
    from openvla_jax.data import transforms as X
    from openvla_jax.data.oxe import get_dataset_config, get_mixture
    from openvla_jax.data.prepare import make_standardize, make_tokenize, make_validator
    from openvla_jax.data.traj import TrajDataset, default_split, open_builder
    from openvla_jax.models.preprocess import FUSED_MEAN, FUSED_STD

    names = [name for name, _ in get_mixture(cfg.mixture)]
    per_dataset: dict[str, list] = {}
    for k, name in enumerate(names):
        want = len(range(k, n, len(names)))  # round-robin share
        if not want:
            continue
        ds_cfg = get_dataset_config(name)
        builder = open_builder(name, cfg.data_dir)
        steps = builder.info.features["steps"]  # pyright: ignore[reportIndexIssue, reportOptionalSubscript]
        standardize = make_standardize(name, ds_cfg, cfg.image_view, list(steps.keys()))
        a_stats, mask = stats[name], ds_cfg.action_mask
        ds = TrajDataset.from_rlds(
            builder,
            default_split(builder, False),
            shuffle=False,
            deterministic=True,
            num_parallel_reads=1,
            num_parallel_calls=1,
            name=name,
        )
        ds = ds.traj_map(standardize).filter(make_validator(name, dataclasses.replace(cfg, on_bad_data="skip"), None))

        def normalize(traj, a_stats=a_stats, mask=mask):
            return dict(traj, action=N.normalize_tf(traj["action"], a_stats, cfg.normalization, mask=mask))

        ds = ds.traj_map(normalize).traj_map(lambda t: X.chunk_act_obs(t, 1, 0))
        ds = ds.traj_map(make_tokenize(name, cfg, tok, act_tok, len(mask)))
        size = (cfg.image_size, cfg.image_size)
        mean, std = np.asarray(FUSED_MEAN, np.float32), np.asarray(FUSED_STD, np.float32)
        eps = []
        for traj in ds.ds.take(want):
            images = np.stack([X.decode_image(im, size).numpy() for im in traj["observation"]["image"][:, 0]])
            x = images.astype(np.float32) / 255.0
            rows, label_ids = split_batch(traj["input_ids"].numpy(), traj["labels"].numpy(), len(mask))
            eps.append(
                {
                    "dataset": name,
                    "instruction": traj["task"]["language_instruction"][0].numpy().decode(),
                    "pixel_values": (np.concatenate([x, x], -1) - mean) / std,
                    "rows": rows,
                    "label_ids": label_ids,
                    "gt_norm": traj["action"].numpy()[:, 0].tolist(),
                }
            )
        per_dataset[name] = eps
    out = []
    for i in range(n):  # round-robin order
        name = names[i % len(names)]
        j = i // len(names)
        if j < len(per_dataset.get(name, [])):
            out.append(per_dataset[name][j])
    return out
