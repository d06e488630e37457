"""train/lora.py: adapters vs an unmerged reference (PEFT's x W + s x A B inside every linear layer),
B = 0 is the base exactly, a step touches only the adapters, the 7B trainable count vs a hand count,
save/load/merge-export (and to-hf), and LoRA learning a fixed batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from configs import model as model_configs
from openvla_jax.models import vla
from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.train import lora as LO
from openvla_jax.train import optimizer as O
from openvla_jax.train import step as ST
from tests.support import helpers

TOK = ActionTokenizer()


def tiny_config():
    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 56  # 4x4 patches
    cfg.dtype = "float32"
    return cfg


CFG = tiny_config()
MODULE = vla.from_config(CFG, dtype=jnp.float32)
SHAPES = nn.meta.unbox(ST.abstract_params(MODULE))


def numpy_params(seed=0):
    return helpers.random_params(MODULE, seed)


BASE = numpy_params()


def make_batch(b=4, t=14, seed=0):
    """Rows: BOS, prompt, 7 action tokens, EOS; labels -100 except actions + EOS."""
    rng = np.random.default_rng(seed)
    ids = np.full((b, t), 32000, np.int32)
    labels = np.full((b, t), -100, np.int32)
    ids[:, 0] = 1
    ids[:, 1 : t - 8] = rng.integers(3, 31000, (b, t - 9))
    ids[:, t - 8 : t - 1] = rng.integers(TOK.first_id, TOK.vocab_size, (b, 7))
    ids[:, t - 1] = 2
    labels[:, t - 8 :] = ids[:, t - 8 :]
    return dict(
        pixel_values=rng.normal(size=(b, 56, 56, 6)).astype(np.float32),
        input_ids=ids,
        attention_mask=np.ones((b, t), bool),
        labels=labels,
    )


BATCH = make_batch()


@jax.jit
def logits_of(params, batch):
    return MODULE.apply({"params": params}, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])


def random_adapters(cfg, seed=1):
    """Adapters with B != 0 (scaled so the deltas are comparable to the weights)."""
    ad = LO.init_lora(SHAPES, cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {
        p: {"A": np.asarray(v["A"]), "B": (0.05 * rng.normal(size=v["B"].shape)).astype(np.float32)}
        for p, v in ad.items()
    }


def test_default_targets_are_every_linear_kernel_but_lm_head():
    got = LO.targets(SHAPES, LO.LoraConfig())
    # by hand: LLM 7 per layer x 2; projector fc1-3; DINO 4 per block x 3; SigLIP 4 x 3 + MAP head
    # (q, kv, proj, mlp fc1, fc2); no lm_head, embeddings, patch embeddings (conv), norms or biases.
    assert len(got) == 14 + 3 + 12 + 12 + 5, sorted(got)
    assert not [p for p in got if "lm_head" in p or "embed" in p or not p.endswith("/kernel")]
    a, b = LO.adapter_shapes("language_model/layers_0/self_attn/o_proj/kernel", (4, 16, 64), 32)
    assert (a, b) == ((64, 32), (32, 64))  # contracts (H, Dh)
    a, b = LO.adapter_shapes("vision_backbone/featurizer/blocks_0/attn/qkv/kernel", (64, 3, 4, 16), 32)
    assert (a, b) == ((64, 32), (32, 192))  # contracts D
    a, b = LO.adapter_shapes("language_model/layers/self_attn/q_proj/kernel", (2, 64, 4, 16), 8)
    assert (a, b) == ((2, 64, 8), (2, 8, 64))  # scan axis kept
    with pytest.raises(ValueError, match="matches no parameter"):
        LO.targets(SHAPES, LO.LoraConfig(target="nothing/.*"))
    with pytest.raises(ValueError, match="dropout"):
        LO.LoraConfig(dropout=0.05)


def test_zero_B_is_the_base_exactly():
    cfg = LO.LoraConfig()
    ad = LO.init_lora(SHAPES, cfg, jax.random.key(0))
    a = np.asarray(ad["language_model/layers_0/mlp/up_proj/kernel"]["A"])
    assert abs(a.std() - 1 / cfg.rank) < 0.1 / cfg.rank  # PEFT "gaussian": N(0, (1/r)^2)
    assert all(not np.asarray(v["B"]).any() for v in ad.values())
    merged = jax.jit(lambda p, a: LO.merge(p, a, cfg))(BASE, ad)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(BASE)):
        np.testing.assert_array_equal(np.asarray(x), y)
    np.testing.assert_array_equal(np.asarray(logits_of(merged, BATCH)), np.asarray(logits_of(BASE, BATCH)))


def unmerged_logits(params, adapters, cfg, batch):
    """The adapter model as PEFT runs it: every adapted Dense/DenseGeneral returns x W + s (x A) B, with
    its contracted axes taken from the module itself (not from lora.py's naming rule)."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.DenseGeneral)):
            return out
        ad = adapters.get("/".join(mod.path) + "/kernel")
        if ad is None:
            return out
        x = args[0]
        n_in = len(mod.axis) if isinstance(getattr(mod, "axis", -1), tuple) else 1
        xf = x.reshape(*x.shape[: x.ndim - n_in], -1)
        return out + (cfg.scale * (xf @ ad["A"]) @ ad["B"]).reshape(out.shape)

    with nn.intercept_methods(interceptor):
        return MODULE.apply({"params": params}, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])


def test_merged_weights_match_the_unmerged_adapter_model():
    cfg = LO.LoraConfig(rank=4, alpha=8.0)
    ad = random_adapters(cfg)
    ref = np.asarray(jax.jit(lambda p, a, b: unmerged_logits(p, a, cfg, b))(BASE, ad, BATCH))
    base = np.asarray(logits_of(BASE, BATCH))
    got = np.asarray(logits_of(LO.merge(BASE, ad, cfg), BATCH))
    assert np.abs(ref - base).max() > 0.05  # the adapters matter
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def count_from_shapes(r: int) -> int:
    """OpenVLA 7B, LoRA on every linear layer: r * (in + out) per layer, from the published shapes."""
    lin = lambda i, o: r * (i + o)  # noqa: E731
    d, m, layers = 4096, 11008, 32  # Llama 2 7B
    llm = layers * (4 * lin(d, d) + 2 * lin(d, m) + lin(m, d))
    dino = 24 * (lin(1024, 3 * 1024) + lin(1024, 1024) + lin(1024, 4096) + lin(4096, 1024))  # ViT-L/14
    w, mm = 1152, 4304  # SigLIP So400m/14: 27 blocks + the MAP attention-pool head
    siglip = 27 * (lin(w, 3 * w) + lin(w, w) + lin(w, mm) + lin(mm, w))
    siglip += lin(w, w) + lin(w, 2 * w) + lin(w, w) + lin(w, mm) + lin(mm, w)
    v = 1024 + 1152  # fused-gelu-mlp projector: 2176 -> 4 * 2176 -> 4096 -> 4096
    proj = lin(v, 4 * v) + lin(4 * v, d) + lin(d, d)
    return llm + dino + siglip + proj


def test_7b_trainable_count_rank_32():
    n, total = LO.trainable_count(model_configs.get_config("7b"), LO.LoraConfig(rank=32))
    pct = 100 * n / total
    print(f"\nLoRA r=32 on openvla-7b: {n:,} trainable of {total:,} ({pct:.3f}%)")
    assert n == count_from_shapes(32)
    assert 1.3 < pct < 1.6  # the paper: ~1.4%


STEP_CFG = LO.LoraConfig(rank=8, alpha=16.0)


def opt(lr=5e-3):
    return O.make_optimizer(
        ml_collections.ConfigDict(
            dict(O.default_optimizer_config().to_dict(), lr=lr, weight_decay=0.01, grad_clip=1.0)
        ),
        LO.abstract_adapters(SHAPES, STEP_CFG),
    )


@pytest.fixture(scope="module")
def step_fn():
    tx, schedule = opt()
    return tx, LO.make_lora_train_step(
        MODULE, tx, schedule, STEP_CFG, supervised_tokens=8, compiler_options=ST.FAST_COMPILE
    )


def test_lora_step_changes_only_adapters(step_fn):
    tx, step = step_fn
    base = jax.tree.map(jnp.asarray, BASE)
    state = LO.init_lora_state(base, STEP_CFG, tx, jax.random.key(3))
    a0 = {p: np.asarray(v["A"]) for p, v in state.params.items()}
    arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # not the scalar step counters
    assert sum(x.size for x in arrays) == 2 * LO.count(state.params)  # Adam mu + nu of the adapters only
    state, m = step(state, base, BATCH)
    assert bool(m["finite"]) and float(m["grad_norm"]) > 0
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(BASE)):  # frozen and not donated
        np.testing.assert_array_equal(np.asarray(x), y)
    unused = {p for p, v in state.params.items() if not np.asarray(v["B"]).any()}
    # every adapter gets a gradient but those of the towers' last block and SigLIP's MAP head: both
    # towers output their second-to-last block (as the original; PEFT adapts those unused layers too)
    dead = (
        "vision_backbone/featurizer/blocks_2/",
        "vision_backbone/fused_featurizer/blocks_2/",
        "vision_backbone/fused_featurizer/attn_pool/",
    )
    assert unused == {p for p in state.params if p.startswith(dead)}, sorted(unused)
    for p, v in state.params.items():
        # B = 0 -> dL/dA = 0, so Adam moves A by weight decay alone: A (1 - lr wd), by hand.
        np.testing.assert_allclose(np.asarray(v["A"]), a0[p] * (1 - 5e-3 * 0.01), rtol=1e-6)
    state, m = step(state, base, BATCH)
    assert int(state.step) == 2
    assert (
        max(np.abs(np.asarray(v["A"]) - a0[p] * (1 - 5e-3 * 0.01) ** 2).max() for p, v in state.params.items()) > 1e-4
    )  # now A gets gradients too


def test_lora_learns_a_fixed_batch(step_fn):
    tx, step = step_fn
    base = jax.tree.map(jnp.asarray, BASE)
    state = LO.init_lora_state(base, STEP_CFG, tx, jax.random.key(4))
    history = []
    for _ in range(60):
        state, m = step(state, base, BATCH)
        history.append((float(m["loss"]), float(m["action_accuracy"])))
    print(
        f"\nLoRA fixed batch: loss {history[0][0]:.3f} -> {history[-1][0]:.3f}, "
        f"accuracy {history[0][1]:.2f} -> {history[-1][1]:.2f}"
    )
    assert history[0][1] < 0.1 and history[-1][1] > 0.8
    # the loss cannot go far below ~7 here: lm_head is not adapted and this random base's lm_head
    # (std 0.05) on an RMS-normed 64-dim state bounds the logits to a few units over 32064 tokens
    assert history[-1][0] < history[0][0] - 2.0, history[::10]


def test_save_load_merge_export_and_to_hf(tmp_path):
    from openvla_jax.checkpoints.converted import convert_to_hf, load_converted, save_converted
    from openvla_jax.convert.io import open_state_dict

    cfg = LO.LoraConfig(rank=4, alpha=8.0)
    ad = random_adapters(cfg, seed=2)
    LO.save_adapters(tmp_path / "ad", ad, cfg)
    back, cfg2 = LO.load_adapters(tmp_path / "ad")
    assert cfg2 == cfg and back.keys() == ad.keys()
    for p in ad:
        np.testing.assert_array_equal(back[p]["A"], ad[p]["A"])
        np.testing.assert_array_equal(back[p]["B"], ad[p]["B"])

    stats = {"new_robot": {"action": {"q01": [0.0] * 7}}}
    save_converted(tmp_path / "base", CFG, BASE, {"old": {}})
    LO.merge_and_export(tmp_path / "base", back, cfg2, tmp_path / "merged", norm_stats=stats)
    _, merged, extras = load_converted(tmp_path / "merged")
    assert extras["norm_stats"] == stats
    want = LO.merge(BASE, ad, cfg)
    host = LO.merge(BASE, ad, cfg, xp=np)  # the export's path: NumPy on the host, nothing on the device
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(host))
    for x, y in zip(jax.tree.leaves(host), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, np.asarray(y), atol=1e-6)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)

    convert_to_hf(tmp_path / "merged", tmp_path / "hf", dtype="float32")
    sd = open_state_dict(tmp_path / "hf")
    q = np.asarray(want["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    key = [k for k in sd.keys() if k.endswith("layers.0.self_attn.q_proj.weight")]
    assert len(key) == 1, list(sd.keys())[:5]
    np.testing.assert_allclose(np.asarray(sd[key[0]]), q.reshape(q.shape[0], -1).T, atol=1e-6)


def test_finetune_configs_hold_the_original_recipe():
    from configs import finetune

    c = finetune.get_config("lora")
    assert LO.LoraConfig(**c.lora.to_dict()) == LO.LoraConfig()  # rank 32, alpha 16, dropout 0, all-linear
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.data.batch_size, c.data.augment) == (5e-4, 0.01, 16, True)
    full = finetune.get_config("full")
    assert "lora" not in full and full.optimizer.lr == 5e-4
    with pytest.raises(ValueError, match="unknown finetune variant"):
        finetune.get_config("qlora")
