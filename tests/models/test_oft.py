"""The OFT options of the VLA: off = OpenVLA exactly; the parallel decoder's mask and its
effect on outputs; several cameras and the proprio token; the continuous head; the policy API."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import model as model_configs
from openvla_jax.models import decoding, llama, vla
from openvla_jax.train.loss import IGNORE_INDEX
from tests.support.helpers import max_abs
from tests.support.vla_refs import build_torch_vla, inputs, torch_greedy, torch_logits, valid_positions, write_hf_dir


def tiny(**opts):
    cfg = model_configs.get_config("tiny")
    cfg.dtype = "float32"
    cfg.vision.image_size = 56  # 4 x 4 patches
    for k, v in opts.items():
        setattr(cfg, k, v)
    return cfg


def init(cfg, seed=0):
    module = vla.from_config(cfg)
    n = cfg.num_images
    pv = jnp.zeros((1, *((n,) if n > 1 else ()), 56, 56, 6))
    params = jax.jit(lambda k: module.init(k, pv, jnp.ones((1, 4), jnp.int32)))(jax.random.key(seed))["params"]
    return module, jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value")
    )


def prompts(b=3, t=9, seed=0, cams=1):
    rng = np.random.default_rng(seed)
    shape = (b, cams, 56, 56, 6) if cams > 1 else (b, 56, 56, 6)
    pv = rng.standard_normal(shape).astype(np.float32)
    ids = rng.integers(3, 31000, (b, t)).astype(np.int32)
    ids[:, 0] = 1
    lengths = np.array([t, t - 4, t - 2][:b])
    mask = np.arange(t)[None] < lengths[:, None]
    return pv, np.where(mask, ids, 32000).astype(np.int32), mask, lengths


# ------------------------------------------------------------------ off = OpenVLA, exactly
def test_chunk_1_one_camera_no_proprio_is_openvla(tmp_path):
    """The options set explicitly to their OpenVLA values: the same parameter tree as a config
    without them, and the PyTorch reference's logits (1e-4) and greedy ids."""
    from openvla_jax.convert.hf import load_hf

    model = build_torch_vla()
    write_hf_dir(model, tmp_path)
    cfg, params, _ = load_hf(tmp_path)
    cfg = cfg.replace(
        action_dim=7, action_chunk=1, decoding="autoregressive", action_head="tokens", proprio_dim=0, num_images=1
    )
    bare = model_configs.get_config("tiny")
    for k in ("action_chunk", "decoding", "action_head", "proprio_dim", "num_images"):
        del bare[k]

    def shapes(c):
        inputs = jnp.zeros((1, 224, 224, 6)), jnp.ones((1, 4), jnp.int32)
        return jax.tree.map(lambda x: x.shape, jax.eval_shape(vla.from_config(c).init, jax.random.key(0), *inputs))

    assert shapes(cfg) == shapes(bare)
    module = vla.from_config(cfg, dtype=jnp.float32)
    assert module.num_patches == 256 and not module.parallel and module.action_head is None
    pv, ids, mask, lengths = inputs(b=2, t=10)
    pv_nhwc = np.transpose(pv, (0, 2, 3, 1))
    out = np.asarray(jax.jit(lambda p: module.apply({"params": p}, pv_nhwc, ids, mask))(params))
    ref = torch_logits(model, pv, ids, mask)
    assert max_abs(valid_positions(out, lengths), valid_positions(ref, lengths)) < 1e-4
    got = jax.jit(lambda p: decoding.greedy_decode(module, p, pv_nhwc, ids, mask, num_tokens=7))(params)
    np.testing.assert_array_equal(np.asarray(got), torch_greedy(model, pv, ids, lengths))


# ------------------------------------------------------------------ the parallel block's mask
def test_mask_is_causal_before_the_block_and_bidirectional_inside():
    valid = jnp.array([[True, True, True, False, True, True, True]])  # slot 3: padding
    m = np.asarray(llama.attention_mask_4d(valid, 7, 0, bidirectional=(4, 3)))[0, 0]
    causal = np.tril(np.ones((7, 7), bool)) & np.asarray(valid)[0][None]
    expect = causal.copy()
    expect[4:, 4:] = True  # the block sees all of itself
    np.testing.assert_array_equal(m, expect)
    assert not m[:4, 4:].any()  # nothing before the block sees into it
    assert not m[:, 3].any()  # the pad slot is seen by nobody
    np.testing.assert_array_equal(np.asarray(llama.attention_mask_4d(valid, 7))[0, 0], causal)


def test_changing_a_later_action_position_changes_earlier_ones_but_not_the_prompt():
    cfg = tiny(action_chunk=2, decoding="parallel")
    module, params = init(cfg)
    lm = module.language_model
    lm_params = params["language_model"]
    n, m = 6, cfg.action_chunk * cfg.action_dim
    x = jax.random.normal(jax.random.key(1), (1, n + m, 64))
    x2 = x.at[:, -1].add(1.0)  # the last action position changes
    run = jax.jit(lambda e, bi: lm.apply({"params": lm_params}, embeddings=e, bidirectional=bi)[0], static_argnums=1)
    a, b = run(x, (n, m)), run(x2, (n, m))
    np.testing.assert_array_equal(np.asarray(a[:, :n]), np.asarray(b[:, :n]))  # the prompt: causal
    assert np.abs(np.asarray(a[:, n:-1] - b[:, n:-1])).max(axis=-1).min() > 1e-4  # every earlier action slot
    c, d = run(x, None), run(x2, None)  # the same without the block: causal everywhere
    np.testing.assert_array_equal(np.asarray(c[:, :-1]), np.asarray(d[:, :-1]))
    # The VLA: placeholders are zeros; a different embedding at the last one moves the first.
    pv, ids, mask, _ = prompts(b=1)
    act = jnp.zeros((1, m, 64))
    f = jax.jit(
        lambda p, e: module.apply({"params": p}, pv, ids, mask, action_embeddings=e, method=vla.VLA.parallel_actions)
    )
    base, moved = f(params, act), f(params, act.at[:, -1].set(1.0))
    assert base.shape == (1, m, 32064)
    assert float(jnp.abs(base[:, 0] - moved[:, 0]).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(base), np.asarray(f(params, None)))


def test_parallel_decoding_is_independent_of_padding_and_batch():
    cfg = tiny(action_chunk=2, decoding="parallel")
    module, params = init(cfg)
    pv, ids, mask, lengths = prompts(b=3)
    dec = jax.jit(lambda p, x, i, mk: decoding.parallel_decode(module, p, x, i, mk))
    batched = np.asarray(dec(params, pv, ids, mask))
    assert batched.shape == (3, 14) and batched.dtype == np.int32
    for r, n in enumerate(lengths):
        alone = np.asarray(dec(params, pv[r : r + 1], ids[r : r + 1, :n], mask[r : r + 1, :n]))
        np.testing.assert_array_equal(alone[0], batched[r])
    # Same as the argmax of the full forward with an explicit causal-then-block layout by hand:
    # row 0 unpadded = prompt embeddings + 14 zero embeddings, bidirectional over the last 14.
    n0 = lengths[0]
    full = module.apply({"params": params}, pv[:1], ids[:1, :n0], method=vla.VLA.embed_inputs)
    x = jnp.concatenate([full, jnp.zeros((1, 14, 64))], 1)
    logits = module.language_model.apply(
        {"params": params["language_model"]}, embeddings=x, bidirectional=(full.shape[1], 14)
    )[0]
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0, -14:], -1)), batched[0])


# ------------------------------------------------------------------ cameras, proprio, continuous head
def test_cameras_and_proprio_are_inserted_after_bos():
    cfg = tiny(num_images=2, proprio_dim=5)
    module, params = init(cfg)
    assert module.num_patches == 2 * 16 + 1
    assert set(params["proprio_projector"]) == {"fc1", "fc2"}
    pv, ids, mask, _ = prompts(b=2, cams=2)
    proprio = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    emb = jax.jit(lambda p, x, pr: module.apply({"params": p}, x, ids, pr, method=vla.VLA.embed_inputs))
    e = np.asarray(emb(params, pv, proprio))
    assert e.shape == (2, 9 + 33, 64)
    # Each camera's block is that image through the one backbone + projector, in camera order.
    one = tiny()
    single = vla.from_config(one)
    sub = {k: params[k] for k in ("vision_backbone", "projector", "language_model")}
    for cam in range(2):
        e1 = np.asarray(single.apply({"params": sub}, pv[:, cam], ids, method=vla.VLA.embed_inputs))
        # a batch of B*N images vs one of B: other GEMM shapes, other summation order (float32)
        np.testing.assert_allclose(e[:, 1 + 16 * cam : 17 + 16 * cam], e1[:, 1:17], rtol=1e-5, atol=1e-5)
    # The proprio token: fc2(gelu(fc1(p))).
    pp = params["proprio_projector"]
    h = jax.nn.gelu(proprio @ pp["fc1"]["kernel"] + pp["fc1"]["bias"], approximate=False)
    np.testing.assert_allclose(e[:, 33], h @ pp["fc2"]["kernel"] + pp["fc2"]["bias"], atol=1e-5)
    np.testing.assert_array_equal(e[:, 34:], e1[:, 17:])  # then the text
    with pytest.raises(ValueError, match="takes 2 images"):
        emb(params, pv[:, 0], proprio)
    with pytest.raises(ValueError, match="proprio"):
        module.apply({"params": params}, pv, ids, mask)


def test_continuous_head_shapes_and_values():
    cfg = tiny(action_chunk=3, decoding="parallel", action_head="l1")
    module, params = init(cfg)
    pv, ids, mask, _ = prompts(b=2)
    out = jax.jit(lambda p: decoding.parallel_decode(module, p, pv, ids, mask))(params)
    assert out.shape == (2, 3, 7) and out.dtype == jnp.float32
    # The head on the hidden states of the 21 placeholders, by hand (LayerNorm, fc_in, 2 blocks, fc_out).
    x = module.apply({"params": params}, pv, ids, method=vla.VLA.embed_inputs)
    n = x.shape[1]
    valid = np.concatenate([vla.multimodal_mask(jnp.asarray(mask), 16), np.ones((2, 21), bool)], 1)
    pos = np.cumsum(valid, 1) - 1
    _, _, hidden = module.language_model.apply(
        {"params": params["language_model"]},
        embeddings=jnp.concatenate([x, jnp.zeros((2, 21, 64))], 1),
        attention_mask=valid,
        positions=pos,
        bidirectional=(n, 21),
        return_hidden=True,
    )
    hp = params["action_head"]

    def ln(v, p):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    dense = lambda v, p: v @ p["kernel"] + p["bias"]  # noqa: E731
    h = np.asarray(hidden[:, n:]).reshape(2, 3, 7 * 64)
    h = np.maximum(dense(ln(h, hp["norm_in"]), hp["fc_in"]), 0)
    for i in range(2):
        h = h + np.maximum(dense(ln(h, hp[f"block{i}_norm"]), hp[f"block{i}_fc"]), 0)
    ref = dense(ln(h, hp["norm_out"]), hp["fc_out"])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="needs model.decoding='parallel'"):
        vla.from_config(tiny(action_head="l1"))
    with pytest.raises(ValueError, match="model.decoding"):
        vla.from_config(tiny(decoding="beam"))
    with pytest.raises(ValueError, match="model.action_chunk"):
        vla.from_config(tiny(action_chunk=0))


# ------------------------------------------------------------------ training: the step's losses
def chunk_batch(b=4, k=2, a=7, seed=0, cams=1, proprio_dim=0):
    """Pipeline-style rows: BOS, prompt, K*A action tokens, EOS, right padding; labels on the actions."""
    rng = np.random.default_rng(seed)
    t = 6 + k * a + 1 + 2
    ids = np.full((b, t), 32000, np.int32)
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, t), bool)
    action = rng.uniform(-1, 1, (b, k, a)).astype(np.float32)
    from openvla_jax.tokenizer.actions import ActionTokenizer

    toks = ActionTokenizer().encode(action).reshape(b, -1)
    for r in range(b):
        p = 4 + r % 3  # prompt lengths differ per row
        ids[r, 0] = 1
        ids[r, 1:p] = rng.integers(3, 31000, p - 1)
        ids[r, p : p + k * a] = toks[r]
        ids[r, p + k * a] = 2
        labels[r, p : p + k * a + 1] = ids[r, p : p + k * a + 1]
        mask[r, : p + k * a + 1] = True
    shape = (b, cams, 56, 56, 6) if cams > 1 else (b, 56, 56, 6)
    batch = dict(
        pixel_values=rng.standard_normal(shape).astype(np.float32),
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        action=action,
    )
    if proprio_dim:
        batch["proprio"] = rng.standard_normal((b, proprio_dim)).astype(np.float32)
    return batch, toks


def make_step(cfg, params, lr=3e-3):
    from openvla_jax.parallel.mesh import single_device_mesh
    from openvla_jax.train.step import FAST_COMPILE, init_train_state, make_train_step

    module = vla.from_config(cfg)
    mesh = single_device_mesh()
    opt = optax.adam(lr)
    state = init_train_state(module, cfg, opt, mesh, None, jax.random.key(0), params=params)
    return module, state, make_train_step(module, opt, lambda s: lr, mesh, compiler_options=FAST_COMPILE)


def test_parallel_token_loss_is_cross_entropy_on_the_placeholders():
    cfg = tiny(action_chunk=2, decoding="parallel")
    module, params = init(cfg)
    batch, toks = chunk_batch()
    _, state, step = make_step(cfg, params)
    _, metrics = step(state, batch)
    prompt = batch["attention_mask"] & (batch["labels"] == IGNORE_INDEX)
    logits = np.asarray(
        module.apply(
            {"params": params}, batch["pixel_values"], batch["input_ids"], prompt, method=vla.VLA.parallel_actions
        ),
        np.float64,
    )
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = logz - np.take_along_axis(logits, toks[..., None], -1)[..., 0]
    assert abs(float(metrics["loss"]) - ce.mean()) < 1e-4
    assert float(metrics["tokens"]) == toks.size and float(metrics["dropped"]) == 0
    assert abs(float(metrics["action_accuracy"]) - (logits.argmax(-1) == toks).mean()) < 1e-6


def test_continuous_variant_learns_a_fixed_batch_with_cameras_and_proprio():
    cfg = tiny(action_chunk=2, decoding="parallel", action_head="l1", num_images=2, proprio_dim=3)
    module, params = init(cfg)
    batch, _ = chunk_batch(cams=2, proprio_dim=3)
    _, state, step = make_step(cfg, params)
    state, first = step(state, batch)
    pred = np.asarray(
        decoding.parallel_decode(
            module,
            params,
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"] & (batch["labels"] == IGNORE_INDEX),
            batch["proprio"],
        )
    )
    assert abs(float(first["loss"]) - np.abs(pred - batch["action"]).mean()) < 1e-5  # L1, before the update
    for _ in range(30):
        state, metrics = step(state, batch)
    assert float(metrics["l1"]) < 0.5 * float(first["l1"]), (float(first["l1"]), float(metrics["l1"]))


def test_rows_without_k_times_a_action_tokens_are_counted():
    from openvla_jax.parallel.mesh import single_device_mesh
    from openvla_jax.train.step import FAST_COMPILE, make_eval_step

    cfg = tiny(action_chunk=3, decoding="parallel")  # expects 21 tokens, the batch has 14
    module, params = init(cfg)
    batch, _ = chunk_batch(k=2)
    sums = make_eval_step(module, single_device_mesh(), compiler_options=FAST_COMPILE)(params, batch)
    assert float(sums["dropped"].sum()) == 4


# ------------------------------------------------------------------ the OpenVLA API
def test_predict_action_returns_unnormalised_chunks(tmp_path):
    """A 2-camera, proprio, K=2 continuous model through `OpenVLA.predict_action`: the raw state is
    normalised with the dataset's proprio statistics, the chunk comes back `[B, K, 7]` unnormalised,
    and a batch equals the rows one by one (bucket padding changes nothing)."""
    from openvla_jax import OpenVLA
    from openvla_jax.data.normalize import normalize, unnormalize
    from openvla_jax.models.preprocess import preprocess_images
    from openvla_jax.tokenizer.prompt import inference_prompt_ids
    from tests.support.rlds_fixtures import train_tiny_sentencepiece

    cfg = tiny(action_chunk=2, decoding="parallel", action_head="l1", num_images=2, proprio_dim=3)
    module, params = init(cfg)
    stats = {
        "robot": {
            "action": {
                "q01": [-0.1] * 6 + [0.0],
                "q99": [0.2] * 6 + [1.0],
                "min": [-1.0] * 7,
                "max": [1.0] * 7,
                "mean": [0.0] * 7,
                "std": [1.0] * 7,
                "mask": [True] * 6 + [False],
            },
            "proprio": {
                "q01": [-2.0, 0.0, 1.0],
                "q99": [2.0, 4.0, 3.0],
                "min": [-3.0, -1.0, 0.0],
                "max": [3.0, 5.0, 4.0],
                "mean": [0.0] * 3,
                "std": [1.0] * 3,
            },
        }
    }
    tok_dir = train_tiny_sentencepiece(str(tmp_path))
    policy = OpenVLA(cfg, jax.device_get(params), stats, tok_dir, dtype="float32")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 2, 40, 40, 3), dtype=np.uint8)
    texts = ["pick up the red block", "open the drawer", "stack the cups"]
    state = rng.uniform(-3, 5, (3, 3))
    got = policy.predict_action(images, texts, proprio=state)
    assert got.shape == (3, 2, 7) and got.dtype == np.float64
    for i in range(3):  # by hand, row by row
        pv = preprocess_images(images[i], 56)[None]
        ids = np.array([inference_prompt_ids(policy.tokenizer, texts[i])], np.int32)
        pr = normalize(state[i : i + 1], stats["robot"]["proprio"])
        raw = decoding.parallel_decode(module, params, pv, ids, np.ones_like(ids, bool), pr)
        want = unnormalize(np.asarray(raw, np.float64), stats["robot"]["action"])
        np.testing.assert_allclose(got[i], want[0], atol=1e-5)
        # batch 1 vs batch 3 (bucket 4): continuous outputs agree to float32 summation order only
        np.testing.assert_allclose(
            policy.predict_action(images[i : i + 1], texts[i], proprio=state[i : i + 1])[0],
            got[i],
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="proprio"):
        policy.predict_action(images, texts)
    with pytest.raises(ValueError, match="2 camera images per row"):
        policy.predict_action(images[:, :1], texts, proprio=state)
