"""train/: loss and metrics vs PyTorch / NumPy (the original train loop's formulas), the optimizer
recipe vs torch AdamW + clip_grad_norm_, and the sharded step: same result on every mesh, sharded as
the rules say, accumulation == one big batch, freezing, NaN guard, eval step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import model as model_configs
from openvla_jax.models import vla
from openvla_jax.parallel import global_batch
from openvla_jax.parallel import mesh as M
from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.train import loss as L
from openvla_jax.train import optimizer as O
from openvla_jax.train import step as ST
from tests.support import helpers
from tests.support.helpers import torch

NUM_DATASETS = 3
TOK = ActionTokenizer()


def tiny_config():
    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 28  # 2x2 patches
    cfg.llm.num_hidden_layers = 1
    cfg.vision.featurizer.depth = 2  # the featurizer runs block 0 only (second-to-last)
    cfg.vision.fused_featurizer.depth = 2
    return cfg


CFG = tiny_config()
MODULE = vla.from_config(CFG, dtype=jnp.float32)  # fp32 compute so meshes agree tightly
P_PATCHES = MODULE.num_patches  # 4


def make_labels(b, t, rng):
    """Right-padded rows: prompt, 7 action tokens, EOS (2); labels -100 except actions + EOS."""
    lengths = rng.integers(t - 3, t + 1, size=b)
    ids = np.full((b, t), 32000, np.int32)
    labels = np.full((b, t), -100, np.int32)
    for i, n in enumerate(lengths):
        ids[i, 0] = 1
        ids[i, 1 : n - 8] = rng.integers(3, 31000, n - 9)
        ids[i, n - 8 : n - 1] = rng.integers(TOK.first_id, TOK.vocab_size, 7)
        ids[i, n - 1] = 2
        labels[i, n - 8 : n] = ids[i, n - 8 : n]
    mask = np.arange(t)[None] < lengths[:, None]
    return ids, labels, mask


def make_batch(b=8, t=14, seed=0):
    rng = np.random.default_rng(seed)
    ids, labels, mask = make_labels(b, t, rng)
    return dict(
        pixel_values=rng.normal(size=(b, 28, 28, 6)).astype(np.float32),
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        dataset_name=np.array([f"ds{i}" for i in rng.integers(0, NUM_DATASETS, b)]),
    )


NAMES = [f"ds{i}" for i in range(NUM_DATASETS)]


def numpy_params(seed=0):
    return helpers.random_params(MODULE, seed)


def opt_config(**kw):
    """lr 1e-3 so one step moves params visibly; eps 1e-3 (for the step tests) keeps Adam's first update
    g / (|g| + eps) a smooth function of g, so float summation-order differences between meshes are not
    amplified into sign flips for near-zero gradients."""
    cfg = O.default_optimizer_config()
    cfg.lr = 1e-3
    cfg.eps = 1e-3
    cfg.update(kw)
    return cfg


def run_step(mesh_shape, params, batch, accumulate_steps=1, freeze=(), module=MODULE, supervised_tokens=None):
    """-> (metrics, new state) of one step from `params` on a mesh (data, fsdp, tensor)."""
    mesh = (
        M.single_device_mesh()
        if mesh_shape is None
        else M.make_mesh(ml_collections.ConfigDict(dict(zip(M.AXES, mesh_shape))))
    )
    ocfg = opt_config(freeze=tuple(freeze))
    tx, schedule = O.make_optimizer(ocfg, ST.abstract_params(module))
    state = ST.init_train_state(
        module, CFG, tx, mesh, None, jax.random.key(0), params=params, compiler_options=ST.FAST_COMPILE
    )
    step = ST.make_train_step(
        module,
        tx,
        schedule,
        mesh,
        num_datasets=NUM_DATASETS,
        accumulate_steps=accumulate_steps,
        freeze=freeze,
        compiler_options=ST.FAST_COMPILE,
        supervised_tokens=supervised_tokens,
    )
    new, metrics = step(state, global_batch(batch, mesh, NAMES))
    return jax.tree.map(np.asarray, metrics), new, step, mesh


# --- loss and metrics vs the original formulas ------------------------------------------------------


def reference_metrics(logits, labels, p):
    """PyTorch CE with ignore_index on multimodal labels (HF), NumPy accuracy / L1 (Prismatic loop)."""
    t = torch()
    mm = np.concatenate([labels[:, :1], np.full((labels.shape[0], p), -100), labels[:, 1:]], axis=1)
    ce = t.nn.functional.cross_entropy(
        t.tensor(logits[:, :-1]).reshape(-1, logits.shape[-1]),
        t.tensor(mm[:, 1:]).reshape(-1).long(),
        ignore_index=-100,
    )
    preds = logits[:, p:-1].argmax(-1)
    gt = labels[:, 1:]
    mask = gt > 31743
    acc = ((preds == gt) & mask).sum() / mask.sum()
    l1 = np.abs(TOK.decode(preds[mask]) - TOK.decode(gt[mask])).mean()
    return float(ce), float(acc), float(l1)


def test_loss_accuracy_l1_match_reference_and_per_dataset_filtering():
    rng = np.random.default_rng(1)
    b, t, p, v = 6, 12, 3, 32064
    _, labels, _ = make_labels(b, t, rng)
    logits = rng.normal(size=(b, t + p, v)).astype(np.float32)
    # make about half of the action predictions right, and a few wrong ones land on non-action ids
    for i, j in zip(*np.nonzero(labels[:, 1:] != -100)):
        if rng.random() < 0.5:
            logits[i, p + j, labels[i, j + 1]] += 30.0
        elif rng.random() < 0.3:
            logits[i, p + j, 500] += 30.0
    ds = np.array([0, 2, 0, 1, 2, 0], np.int32)
    loss_sum, sums = jax.jit(lambda lg, lb, d: L.loss_and_sums(lg, lb, p, dataset_index=d, num_datasets=3))(
        logits, labels, ds
    )
    m = jax.tree.map(np.asarray, L.summarize(sums))
    ce, acc, l1 = reference_metrics(logits, labels, p)
    assert 0.2 < acc < 0.9  # the test data exercises both outcomes
    np.testing.assert_allclose([m["loss"], m["action_accuracy"], m["l1"]], [ce, acc, l1], rtol=1e-5)
    np.testing.assert_allclose(float(loss_sum) / m["tokens"], ce, rtol=1e-5)
    assert m["tokens"] == 8 * b and m["action_tokens"] == 7 * b  # EOS counts in the loss only
    for d in range(3):
        rows = ds == d
        want = reference_metrics(logits[rows], labels[rows], p)
        got = [m["dataset_loss"][d], m["dataset_action_accuracy"][d], m["dataset_l1"][d]]
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_decode_matches_action_tokenizer():
    ids = np.arange(31600, 32064)
    np.testing.assert_array_equal(np.asarray(L.decode_actions(jnp.asarray(ids), TOK)), TOK.decode(ids))


def test_absent_dataset_is_nan_not_zero():
    logits = jnp.zeros((2, 10 + 2, 32064))
    labels = jnp.asarray(make_labels(2, 10, np.random.default_rng(0))[1])
    m = L.summarize(L.token_sums(logits, labels, 2, dataset_index=jnp.array([0, 0]), num_datasets=2))
    assert np.isfinite(m["dataset_loss"][0]) and np.isnan(m["dataset_loss"][1])


# --- optimizer -------------------------------------------------------------------------------------


def test_recipe_defaults_and_schedules():
    cfg = O.default_optimizer_config()
    assert (cfg.lr, cfg.schedule, cfg.weight_decay, cfg.grad_clip) == (2e-5, "constant", 0.0, 1.0)
    assert (cfg.b1, cfg.b2, cfg.eps, tuple(cfg.freeze), cfg.accumulate_steps) == (0.9, 0.999, 1e-8, (), 1)
    sched = O.make_schedule(cfg)
    assert [float(sched(s)) for s in (0, 1, 10_000)] == pytest.approx([2e-5] * 3)
    cos = O.make_schedule(opt_config(schedule="warmup_cosine", warmup_steps=10, total_steps=110, end_lr_ratio=0.1))
    # HF get_cosine_schedule_with_warmup with a floor: linear 0 -> lr, then cosine to 0.1 lr.
    want = lambda s: 1e-3 * s / 10 if s < 10 else 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * (s - 10) / 100))  # noqa: E731
    for s in (0, 5, 10, 35, 60, 110, 200):
        assert float(cos(s)) == pytest.approx(want(min(s, 110)), rel=1e-5, abs=1e-12), s


def test_adamw_clip_decay_mask_match_torch():
    """3 steps of make_optimizer (wd 0.01, clip 1.0) == torch AdamW with Prismatic's param groups
    (decay: >= 2 dims and not bias) + clip_grad_norm_(1.0); gradients large enough to be clipped."""
    t = torch()
    rng = np.random.default_rng(0)
    params = {
        "dense": {
            "kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
        "norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
    }
    grads = [jax.tree.map(lambda x: (5 * rng.normal(size=x.shape)).astype(np.float32), params) for _ in range(3)]
    cfg = opt_config(weight_decay=0.01, eps=1e-8)
    tx, _ = O.make_optimizer(cfg, params)
    p, state = params, tx.init(params)
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)

    tp = {
        k: t.nn.Parameter(t.tensor(v))
        for k, v in {"k": params["dense"]["kernel"], "b": params["dense"]["bias"], "s": params["norm"]["scale"]}.items()
    }
    opt = t.optim.AdamW(
        [{"params": [tp["k"]], "weight_decay": 0.01}, {"params": [tp["b"], tp["s"]], "weight_decay": 0.0}], lr=1e-3
    )
    norms = []
    for g in grads:
        for key, val in (("k", g["dense"]["kernel"]), ("b", g["dense"]["bias"]), ("s", g["norm"]["scale"])):
            tp[key].grad = t.tensor(val)
        norms.append(float(t.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)))
        opt.step()
    assert min(norms) > 1.0  # clipping was active
    np.testing.assert_allclose(p["dense"]["kernel"], tp["k"].detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p["dense"]["bias"], tp["b"].detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p["norm"]["scale"], tp["s"].detach().numpy(), rtol=1e-5, atol=1e-7)
    # the clip alone bounds the update norm by max_norm
    clipped, _ = O.clip_by_global_norm_torch(1.0).update(grads[0], optax.EmptyState())
    assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_decay_mask_on_the_vla():
    flat = dict(
        zip(
            jax.tree.leaves(O.param_paths(ST.abstract_params(MODULE))),
            jax.tree.leaves(O.decay_mask(ST.abstract_params(MODULE))),
        )
    )
    assert flat["language_model/layers_0/self_attn/q_proj/kernel"]
    assert flat["vision_backbone/featurizer/pos_embed"] and flat["vision_backbone/featurizer/cls_token"]
    assert not flat["language_model/norm/scale"]
    assert not flat["vision_backbone/featurizer/blocks_0/attn/qkv/bias"]  # [3, H, Dh] but a bias
    assert not flat["vision_backbone/featurizer/blocks_0/ls1/scale_factor"]
    scanned = vla.from_config(CFG, scan_layers=True)
    flat = dict(
        zip(
            jax.tree.leaves(O.param_paths(ST.abstract_params(scanned))),
            jax.tree.leaves(nn.meta.unbox(O.decay_mask(nn.meta.unbox(ST.abstract_params(scanned))))),
        )
    )
    assert not flat["language_model/layers/input_layernorm/scale"]  # [L, D]: 1-D per layer
    assert flat["language_model/layers/mlp/up_proj/kernel"]


# --- the sharded step ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    params, batch = numpy_params(), make_batch()
    metrics, state, step, mesh = run_step(None, params, batch)
    return dict(
        params=params, batch=batch, metrics=metrics, new=jax.tree.map(np.asarray, state.params), step=step, mesh=mesh
    )


def _max_rel(a, b):
    return max(
        float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_same_step_on_every_mesh(reference, shape):
    metrics, state, _, _ = run_step(shape, reference["params"], reference["batch"])
    ref = reference["metrics"]
    assert bool(metrics["finite"]) and int(state.step) == 1
    for k in ("loss", "action_accuracy", "l1", "grad_norm", "dataset_loss"):
        np.testing.assert_allclose(metrics[k], ref[k], rtol=1e-5, err_msg=k)
    err = _max_rel(jax.tree.map(np.asarray, state.params), reference["new"])
    assert err < 1e-5, err
    if shape == (2, 2, 2):  # the state keeps the rule's shardings after the step
        lm = state.params["language_model"]
        assert lm["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
        assert lm["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
        qkv = state.params["vision_backbone"]["featurizer"]["blocks_0"]["attn"]["qkv"]["kernel"]
        assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
        assert qkv.addressable_shards[0].data.shape == (32, 3, 2, 16)  # [64/fsdp, 3, 4/tensor, 16]


def test_accumulation_equals_one_big_batch(reference):
    """2 microbatches of 4 rows on (2, 2, 2) == one step on all 8 rows on one device."""
    metrics, state, _, _ = run_step((2, 2, 2), reference["params"], reference["batch"], accumulate_steps=2)
    for k in ("loss", "action_accuracy", "grad_norm", "tokens"):
        np.testing.assert_allclose(metrics[k], reference["metrics"][k], rtol=1e-5, err_msg=k)
    err = _max_rel(jax.tree.map(np.asarray, state.params), reference["new"])
    assert err < 1e-5, err


def test_logits_at_supervised_positions_only_give_the_same_step(reference):
    """lm_head at the 8 supervised positions (7 actions + EOS) per row == at all T + P positions;
    with K too small the dropped targets are counted (the loop refuses such a step)."""
    metrics, state, _, _ = run_step((2, 2, 2), reference["params"], reference["batch"], supervised_tokens=8)
    for k in ("loss", "action_accuracy", "l1", "grad_norm", "tokens", "dataset_loss"):
        np.testing.assert_allclose(metrics[k], reference["metrics"][k], rtol=1e-5, err_msg=k)
    assert float(metrics["dropped"]) == 0
    assert _max_rel(jax.tree.map(np.asarray, state.params), reference["new"]) < 1e-5
    metrics, _, _, _ = run_step(None, reference["params"], reference["batch"], supervised_tokens=5)
    assert float(metrics["dropped"]) == 3 * len(reference["batch"]["labels"])
    assert float(metrics["tokens"]) == 5 * len(reference["batch"]["labels"])


def test_nan_guard_keeps_state(reference):
    params = jax.tree.map(np.copy, reference["params"])
    params["language_model"]["lm_head"]["kernel"][0, 0] = np.nan
    tx, _ = O.make_optimizer(opt_config(), params)
    state = ST.init_train_state(
        MODULE, CFG, tx, reference["mesh"], None, jax.random.key(0), params=params, compiler_options=ST.FAST_COMPILE
    )
    before = jax.tree.map(np.asarray, state)
    new, metrics = reference["step"](state, global_batch(reference["batch"], reference["mesh"], NAMES))
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
    assert int(new.step) == 0
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, new)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)  # NaN == NaN here; everything else bit-identical


def test_a_skipped_update_is_sticky_when_the_loop_passes_its_step(reference):
    """`expected_step`: once a step was skipped (state.step lags the loop's count), later finite
    steps keep the state too; without it (or when the counts agree) they update."""
    tx, _ = O.make_optimizer(opt_config(), reference["params"])
    state = ST.init_train_state(
        MODULE,
        CFG,
        tx,
        reference["mesh"],
        None,
        jax.random.key(0),
        params=reference["params"],
        compiler_options=ST.FAST_COMPILE,
    )
    batch = global_batch(reference["batch"], reference["mesh"], NAMES)
    before = jax.tree.map(np.asarray, state.params)
    lagging, metrics = reference["step"](state, batch, expected_step=1)  # the loop counted a skipped step
    assert bool(metrics["finite"]) and int(lagging.step) == 0
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, lagging.params)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    new, _ = reference["step"](lagging, batch, expected_step=0)
    assert int(new.step) == 1 and _max_rel(jax.tree.map(np.asarray, new.params), reference["new"]) < 1e-5


def test_freeze_vision(reference):
    metrics, state, _, _ = run_step(None, reference["params"], reference["batch"], freeze=["vision_backbone/.*"])
    new = jax.tree.map(np.asarray, state.params)
    for a, b in zip(jax.tree.leaves(new["vision_backbone"]), jax.tree.leaves(reference["params"]["vision_backbone"])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(new["projector"]["fc1"]["kernel"], reference["params"]["projector"]["fc1"]["kernel"])
    # no moments for frozen params: Adam's mu holds only the trained leaves
    n_trained = len(jax.tree.leaves(reference["params"])) - len(jax.tree.leaves(reference["params"]["vision_backbone"]))
    inner = state.opt_state.inner_states
    assert len(jax.tree.leaves(inner["frozen"])) == 0
    adam = inner["train"].inner_state[1][0]  # chain(clip, adamw) -> adamw = chain(scale_by_adam, ...)
    assert len(jax.tree.leaves(adam.mu)) == len(jax.tree.leaves(adam.nu)) == n_trained
    assert isinstance(adam.mu["vision_backbone"]["featurizer"]["pos_embed"], optax.MaskedNode)
    # the grad norm covers the trained params only: smaller than with everything trained
    assert 0 < metrics["grad_norm"] < reference["metrics"]["grad_norm"]
    with pytest.raises(ValueError, match="matches no parameter"):
        O.make_optimizer(opt_config(freeze=("vision/.*",)), reference["params"])


def test_eval_step_matches_train_metrics(reference):
    mesh = M.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    ev = ST.make_eval_step(MODULE, mesh, num_datasets=NUM_DATASETS, compiler_options=ST.FAST_COMPILE)
    shardings = ST.train_state_shardings(MODULE, optax.adam(1e-3), mesh).params
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), reference["params"], shardings)
    m = jax.tree.map(np.asarray, L.summarize(ev(params, global_batch(reference["batch"], mesh, NAMES))))
    for k in ("loss", "action_accuracy", "l1", "dataset_loss"):
        np.testing.assert_allclose(m[k], reference["metrics"][k], rtol=1e-5, err_msg=k)


def test_init_creates_sharded_state():
    mesh = M.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    tx, _ = O.make_optimizer(opt_config(), ST.abstract_params(MODULE))
    state = ST.init_train_state(MODULE, CFG, tx, mesh, None, jax.random.key(0), compiler_options=ST.FAST_COMPILE)
    q = state.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == jnp.float32 and q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (32, 2, 16)
    mu = state.opt_state[1][0].mu["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec
    assert int(state.step) == 0 and state.rng.dtype == jnp.uint32
    # a real init (not zeros): std of the Llama kernels is initializer_range (0.02)
    assert abs(float(jnp.std(q)) - 0.02) < 0.005
