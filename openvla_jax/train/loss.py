"""The training loss and the metrics OpenVLA logs, as sums so they add up over microbatches/devices.

Positions (HF layout from `VLA.__call__`): logits `[B, T + P, V]` hold BOS at 0, P patches at 1..P,
then text tokens 1..T-1 at P+1..T+P-1; labels `[B, T]` are the pipeline's (-100 except the action
tokens and the EOS). Prismatic extends labels with `multimodal_labels` (P x -100 after BOS) and
shifts by one: logits[:, :-1] vs labels_mm[:, 1:]. The first P of those targets are all -100, so this
equals logits[:, P:-1] vs labels[:, 1:], which is what we compute (no log-softmax over patches).

  loss      = mean over targets != -100 of cross-entropy (fp32, all V logits)   (HF LlamaForCausalLM)
  accuracy  = mean over action targets (label > action_begin = 31743) of argmax == label
  l1        = mean over action targets of |decode(argmax) - decode(label)|, decode = bin centers
The EOS is in the loss but not in accuracy / L1 (as the original train loop).

The OFT options (models/vla.py) reuse the same sums: the parallel token decoder has logits
`[B, K*A, V]` at its placeholders for the K*A action tokens (no EOS: nothing follows the block);
the continuous head (`continuous_sums`) has loss = l1 = |pred - action| on the normalised actions,
and accuracy = both fall in the same one of the 256 bins, comparable with the token models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from openvla_jax.tokenizer.actions import ActionTokenizer

IGNORE_INDEX = -100
SUM_KEYS = ("loss_sum", "tokens", "correct", "action_tokens", "l1_sum")


def decode_actions(ids: jax.Array, tokenizer: ActionTokenizer) -> jax.Array:
    """Token ids -> bin centers (fp32), `ActionTokenizer.decode` in jnp: ids outside are clipped."""
    centers = jnp.asarray(tokenizer.bin_centers.astype(np.float32))
    idx = jnp.clip(tokenizer.vocab_size - ids.astype(jnp.int32) - 1, 0, tokenizer.n_bins - 2)
    return centers[idx]


def _per_token(logits, labels, num_patches, tok):
    """-> per-target arrays `[B, T-1]`: ce (0 where ignored), valid, correct, action, l1."""
    b, t = labels.shape
    if logits.shape[:2] != (b, t + num_patches):
        raise ValueError(
            f"logits {logits.shape} do not match labels {labels.shape} + {num_patches} patches: "
            f"expected [B, T + P, V] = [{b}, {t + num_patches}, V]"
        )
    return _per_target(logits[:, num_patches:-1], labels[:, 1:], tok)


def _per_target(pred_logits, target, tok):
    """pred_logits `[B, K, V]` and the targets they predict `[B, K]` -> per-target arrays."""
    pred_logits = pred_logits.astype(jnp.float32)
    target = target.astype(jnp.int32)
    valid = target != IGNORE_INDEX
    logz = jax.nn.logsumexp(pred_logits, axis=-1)
    picked = jnp.take_along_axis(pred_logits, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, logz - picked, 0.0)
    preds = jnp.argmax(pred_logits, axis=-1)
    action = target > tok.vocab_size - (tok.n_bins + 1)  # Prismatic's action_token_begin_idx (31743)
    correct = (preds == target) & action
    l1 = jnp.where(action, jnp.abs(decode_actions(preds, tok) - decode_actions(target, tok)), 0.0)
    return dict(ce=ce, valid=valid, correct=correct, action=action, l1=l1)


def supervised_positions(labels: jax.Array, num_patches: int, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first `k` supervised targets of each row, for computing logits only there.

    labels `[B, T]` -> (logits positions `[B, k]` in the HF layout (position P + j predicts
    labels[:, j + 1]), their targets `[B, k]` (-100 where a row has fewer than k), and the number of
    supervised targets beyond the first k, summed over the batch (must be 0: nothing dropped))."""
    target = labels[:, 1:].astype(jnp.int32)
    valid = target != IGNORE_INDEX
    k = min(k, target.shape[1])
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :k]  # supervised first, in position order
    picked = jnp.take_along_axis(target, order, axis=1)
    dropped = valid.sum() - (picked != IGNORE_INDEX).sum()
    return order + num_patches, picked, dropped


def loss_and_sums(
    logits: jax.Array,
    labels: jax.Array,
    num_patches: int | None,
    *,
    dataset_index: jax.Array | None = None,
    num_datasets: int = 1,
    tokenizer: ActionTokenizer | None = None,
) -> tuple[jax.Array, dict]:
    """-> (CE summed over all supervised targets, scalar fp32 -- divide by the total token count for
    the mean; differentiate this), per-dataset sums (metrics, no gradient), each `[num_datasets]` fp32.

    logits `[B, T + P, V]`, labels `[B, T]` int; or, with `num_patches=None`, logits `[B, K, V]` at
    chosen positions and the targets they predict `[B, K]` (see `supervised_positions`); dataset_index
    `[B]` int32 in [0, num_datasets).
    Sum keys: loss_sum (CE over supervised targets), tokens (their count), correct / action_tokens
    (argmax hits and count over action targets), l1_sum (summed |decoded pred - decoded label|)."""
    tok = tokenizer or ActionTokenizer()
    p = _per_token(logits, labels, num_patches, tok) if num_patches is not None else _per_target(logits, labels, tok)
    per_row = jnp.stack(
        [p["ce"].sum(1), p["valid"].sum(1), p["correct"].sum(1), p["action"].sum(1), p["l1"].sum(1)], axis=-1
    ).astype(jnp.float32)  # [B, 5]
    return p["ce"].sum(), _per_dataset(per_row, dataset_index, num_datasets)


def _per_dataset(per_row, dataset_index, num_datasets) -> dict:
    """per_row `[B, 5]` (SUM_KEYS order) -> {key: `[num_datasets]`}, no gradient."""
    if dataset_index is None:
        dataset_index = jnp.zeros((per_row.shape[0],), jnp.int32)
    onehot = jax.nn.one_hot(dataset_index, num_datasets, dtype=jnp.float32)
    per_ds = jnp.einsum("bd,bk->kd", onehot, jax.lax.stop_gradient(per_row), precision=jax.lax.Precision.HIGHEST)
    return dict(zip(SUM_KEYS, per_ds))


def action_targets(labels: jax.Array, num_actions: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pipeline's labels `[B, T]` -> (the first `num_actions` action tokens of each row `[B, n]`,
    the prompt mask `[B, T]` (labels == -100: the prompt, to be followed by the placeholders), and the
    number of rows whose supervised targets are not exactly n action tokens + EOS (must be 0))."""
    valid = labels != IGNORE_INDEX
    _, targets, _ = supervised_positions(labels, 0, num_actions)  # labels[:, 0] is BOS: never supervised
    bad = (valid.sum(axis=1) != num_actions + 1).sum()
    return targets, ~valid, bad


def continuous_sums(
    pred: jax.Array,
    target: jax.Array,
    *,
    dataset_index: jax.Array | None = None,
    num_datasets: int = 1,
    tokenizer: ActionTokenizer | None = None,
) -> tuple[jax.Array, dict]:
    """The continuous head: pred / target normalised actions `[B, K, A]` -> (summed L1, the sums of
    `loss_and_sums`: loss_sum = l1_sum = sum |pred - target|, tokens = action_tokens = B*K*A count,
    correct = elements whose pred and target land in the same action bin)."""
    tok = tokenizer or ActionTokenizer()
    if pred.shape != target.shape:
        raise ValueError(f"predicted actions {pred.shape} and target actions {target.shape} differ")
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    err = jnp.abs(pred - target).reshape(pred.shape[0], -1)
    bins = jnp.asarray(tok.bins.astype(np.float32))
    same = jnp.digitize(jnp.clip(pred, -1, 1), bins) == jnp.digitize(jnp.clip(target, -1, 1), bins)
    count = jnp.full((pred.shape[0],), err.shape[1], jnp.float32)
    per_row = jnp.stack(
        [err.sum(1), count, same.reshape(pred.shape[0], -1).sum(1).astype(jnp.float32), count, err.sum(1)], axis=-1
    )
    return err.sum(), _per_dataset(per_row, dataset_index, num_datasets)


def token_sums(logits, labels, num_patches, **kwargs) -> dict:
    """The per-dataset sums of `loss_and_sums` alone (evaluation)."""
    return loss_and_sums(logits, labels, num_patches, **kwargs)[1]


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.nan)


def summarize(sums: dict) -> dict:
    """Per-dataset sums -> metrics: loss, action_accuracy, l1 (all datasets) and dataset_* `[D]`
    versions (NaN for a dataset absent from the batch), plus the token counts."""
    total = {k: v.sum() for k, v in sums.items()}
    extra = {"dropped": total["dropped"]} if "dropped" in total else {}
    return extra | {
        "loss": _ratio(total["loss_sum"], total["tokens"]),
        "action_accuracy": _ratio(total["correct"], total["action_tokens"]),
        "l1": _ratio(total["l1_sum"], total["action_tokens"]),
        "tokens": total["tokens"],
        "action_tokens": total["action_tokens"],
        "dataset_loss": _ratio(sums["loss_sum"], sums["tokens"]),
        "dataset_action_accuracy": _ratio(sums["correct"], sums["action_tokens"]),
        "dataset_l1": _ratio(sums["l1_sum"], sums["action_tokens"]),
        "dataset_tokens": sums["tokens"],
        "dataset_action_tokens": sums["action_tokens"],
    }
