"""Every fast path computes what the plain path computes, on CPU.

attention_impl (dpa vs xla, VLA level; cudnn refused off GPU), scan + named remat policies (a whole
train step), bf16 storage of frozen params, the persistent compilation cache (a second process hits
it), donated train-state buffers, and the decoder compiled once per batch bucket. Layer-level checks
live beside each layer (tests/models/test_llama.py, tests/models/test_vit.py); these are the model / step level.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import model as model_configs
from openvla_jax.convert.hf import vla_specs
from openvla_jax.convert.mapping import flax_to_hf, hf_to_flax
from openvla_jax.models import common, vla
from openvla_jax.parallel import mesh as M
from openvla_jax.parallel.batch import global_batch
from openvla_jax.train import optimizer as O
from openvla_jax.train import step as ST
from tests.support import helpers

ROOT = Path(__file__).resolve().parents[2]


def tiny_config():
    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 28  # 2x2 patches
    cfg.llm.num_hidden_layers = 2  # >= 2 so a scan over layers is a real loop
    cfg.vision.featurizer.depth = 3
    cfg.vision.fused_featurizer.depth = 3
    return cfg


CFG = tiny_config()
PLAIN = vla.from_config(CFG, dtype=jnp.float32)


def random_params(seed=0):
    return helpers.random_params(PLAIN, seed)


def to_scanned(params):
    """Unscanned -> scanned layout through the HF names (the converter's own tables)."""
    hf = dict(flax_to_hf(vla_specs(CFG, False), params))
    return hf_to_flax(vla_specs(CFG, True), hf)


def make_batch(b=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 31000, (b, t)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, -8:-1] = rng.integers(31744, 32000, (b, 7))
    ids[:, -1] = 2
    labels = np.full((b, t), -100, np.int32)
    labels[:, -8:] = ids[:, -8:]
    mask = np.ones((b, t), bool)
    return dict(
        pixel_values=rng.normal(size=(b, 28, 28, 6)).astype(np.float32),
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
    )


PARAMS = random_params()
BATCH = make_batch()


def one_step(module, params, freeze=(), frozen_dtype="float32", donate=True):
    """-> (metrics, old state, new state) of one AdamW step on one device."""
    mesh = M.single_device_mesh()
    ocfg = O.default_optimizer_config()
    ocfg.update(lr=1e-3, eps=1e-3, freeze=tuple(freeze), frozen_dtype=frozen_dtype)
    tx, schedule = O.make_optimizer(ocfg, ST.abstract_params(module))
    state = ST.init_train_state(
        module, CFG, tx, mesh, None, jax.random.key(0), params=params, compiler_options=ST.FAST_COMPILE
    )
    state = state.replace(params=O.cast_frozen(state.params, ocfg))
    step = ST.make_train_step(
        module, tx, schedule, mesh, freeze=freeze, donate=donate, compiler_options=ST.FAST_COMPILE
    )
    new, metrics = step(state, global_batch(BATCH, mesh))
    return jax.tree.map(np.asarray, metrics), state, new


@pytest.fixture(scope="module")
def plain_step():
    metrics, old, new = one_step(PLAIN, PARAMS)
    return metrics, jax.tree.map(np.asarray, new.params), old, new


def test_cudnn_attention_is_refused_off_gpu():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="needs a GPU.*'dpa'"):
        common.attention(q, q, q, None, impl="cudnn")
    with pytest.raises(ValueError, match="unknown attention impl"):
        common.attention(q, q, q, None, impl="flash")


def test_vla_dot_product_attention_matches_xla():
    """Whole VLA (both ViT towers, the Llama with a padded causal mask): dpa logits == xla logits."""
    b = BATCH
    mask = b["attention_mask"].copy()
    mask[1, -3:] = False  # a right-padded row: the mask matters
    out = {}
    for impl in ("xla", "dpa"):
        module = vla.from_config(CFG, dtype=jnp.float32, attention_impl=impl)
        out[impl] = np.asarray(jax.jit(module.apply)({"params": PARAMS}, b["pixel_values"], b["input_ids"], mask))
    assert np.abs(out["xla"]).max() > 1e-2
    np.testing.assert_allclose(out["dpa"], out["xla"], rtol=2e-5, atol=2e-5)


def test_raw_uint8_pixels_are_normalised_on_device_exactly_as_on_the_host():
    """DataConfig(pixels="uint8") batches: the model normalises them; same logits as host-normalised."""
    from openvla_jax.models.preprocess import normalize_uint8
    from openvla_jax.models.vision import normalize_pixels

    b = BATCH
    raw = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    apply = jax.jit(PLAIN.apply)
    on_host = np.asarray(apply({"params": PARAMS}, normalize_uint8(raw), b["input_ids"], b["attention_mask"]))
    on_device = np.asarray(apply({"params": PARAMS}, raw, b["input_ids"], b["attention_mask"]))
    assert np.abs(on_host).max() > 1e-2
    # XLA may fold the /255 into a multiply: pixels agree to an ulp, logits to fp32 parity.
    np.testing.assert_allclose(np.asarray(normalize_pixels(raw)), normalize_uint8(raw), rtol=0, atol=1e-6)
    np.testing.assert_allclose(on_device, on_host, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"raw uint8 images \[..., H, W, 3\]"):
        apply({"params": PARAMS}, np.zeros((4, 28, 28, 6), np.uint8), b["input_ids"], b["attention_mask"])


@pytest.mark.parametrize("policy", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_scan_and_remat_give_the_same_train_step(plain_step, policy):
    """scan over layers + a named remat policy: same loss, grad norm and updated params as the plain
    unrolled step (params compared after converting back through the scanned layout)."""
    metrics, new, _, _ = plain_step
    module = vla.from_config(CFG, dtype=jnp.float32, scan_layers=True, remat_policy=policy)
    m, _, state = one_step(module, to_scanned(PARAMS))
    for k in ("loss", "grad_norm", "action_accuracy"):
        np.testing.assert_allclose(m[k], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
    back = dict(flax_to_hf(vla_specs(CFG, True), jax.tree.map(np.asarray, state.params)))
    want = dict(flax_to_hf(vla_specs(CFG, False), new))
    assert back.keys() == want.keys()
    worst = max(float(np.abs(back[k] - want[k]).max()) for k in want)
    assert worst < 1e-5, worst
    moved = max(float(np.abs(want[k] - v).max()) for k, v in flax_to_hf(vla_specs(CFG, False), PARAMS))
    assert moved > 1e-4  # the step did move the params: the comparison above is not vacuous


def test_frozen_params_stored_in_bf16():
    """freeze the vision towers, store them in bf16: same loss within bf16 rounding of the frozen weights,
    frozen leaves bf16 and unchanged after the step, trained leaves fp32 and updated as with fp32 towers."""
    freeze = ["vision_backbone/.*"]
    m32, _, s32 = one_step(PLAIN, PARAMS, freeze=freeze)
    m16, old, s16 = one_step(PLAIN, PARAMS, freeze=freeze, frozen_dtype="bfloat16")
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-2)
    assert m16["loss"] != m32["loss"]  # the towers really ran in bf16-rounded weights
    new16 = jax.tree.map(np.asarray, s16.params)
    for leaf, orig in zip(jax.tree.leaves(new16["vision_backbone"]), jax.tree.leaves(PARAMS["vision_backbone"])):
        assert leaf.dtype == jnp.bfloat16
        np.testing.assert_array_equal(leaf, orig.astype(jnp.bfloat16))  # frozen: the bf16 copy, untouched
    for name in ("projector", "language_model"):
        for a, b in zip(jax.tree.leaves(new16[name]), jax.tree.leaves(jax.tree.map(np.asarray, s32.params[name]))):
            assert a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)  # lr 1e-3: within a step's rounding
    with pytest.raises(ValueError, match="frozen_dtype"):
        O.cast_frozen(PARAMS, ml_collections.ConfigDict(dict(freeze=freeze, frozen_dtype="int8")))


def test_train_step_donates_the_old_state(plain_step):
    """The step's input state (params and optimizer moments) is donated: its buffers are deleted after
    the call, so params + Adam state exist once in memory, not twice."""
    _, _, old, new = plain_step
    assert all(x.is_deleted() for x in jax.tree.leaves(old.params))
    moments = [x for x in jax.tree.leaves(old.opt_state) if isinstance(x, jax.Array) and x.ndim]
    assert moments and all(x.is_deleted() for x in moments)
    assert not any(x.is_deleted() for x in jax.tree.leaves(new.params))


def test_decoder_compiles_once_per_bucket_and_keeps_its_params():
    """Batches 3 and 4 share the power-of-two bucket 4: one compile; 5 needs bucket 8. The params are
    never donated (the same buffers serve every call)."""
    from openvla_jax.policy import OpenVLA

    model = OpenVLA(CFG, PARAMS, dtype="float32")
    rng = np.random.default_rng(1)
    pv = rng.normal(size=(5, 28, 28, 6)).astype(np.float32)
    ids = rng.integers(3, 31000, (5, 9)).astype(np.int32)
    first = model.action_token_ids(pv[:3], ids[:3])
    n = model._decode._cache_size()
    four = model.action_token_ids(pv[:4], ids[:4])
    assert model._decode._cache_size() == n
    np.testing.assert_array_equal(four[:3], first)  # padding rows never change a row's result
    model.action_token_ids(pv, ids)
    assert model._decode._cache_size() == n + 1
    assert not any(x.is_deleted() for x in jax.tree.leaves(model.params))


CACHE_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax, jax.numpy as jnp
    from openvla_jax.utils.compile_cache import CacheHits, enable_compilation_cache
    path = enable_compilation_cache()  # from $OPENVLA_JAX_COMPILATION_CACHE
    hits = CacheHits()
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
    print(path, float(f(jnp.arange(64.0).reshape(8, 8) / 64)), hits.count)
""")


def test_persistent_compilation_cache_is_hit_by_a_second_process(tmp_path):
    cache = tmp_path / "xla_cache"
    env = dict(os.environ, OPENVLA_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""  # one device, as a plain run
    code = CACHE_CHILD.format(root=str(ROOT))
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    (p1, v1, h1), (p2, v2, h2) = (r.stdout.split()[-3:] for r in runs)
    assert p1 == p2 == str(cache)
    assert v1 == v2
    assert int(h1) == 0 and int(h2) >= 1, (h1, h2)  # first compiles and writes, second loads
    assert any(cache.iterdir())
    from openvla_jax.utils.compile_cache import cache_dir_from

    assert cache_dir_from("/x") == "/x"
