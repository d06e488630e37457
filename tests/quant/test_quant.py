"""Weight-only int8 / int4 quantization on the tiny VLA (random weights, 56 px images).

References: NumPy re-implementations of the quantizers (per-channel int8, grouped int4, nibble
packing); the fp32 model for logits / greedy action ids; the fp32 model run on the dequantized
weights, which the jitted dequantize-in-the-trace path must reproduce exactly.
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.model import get_config
from openvla_jax import OpenVLA, quant
from openvla_jax.checkpoints import quantized as qckpt
from openvla_jax.models import vla as vla_lib
from openvla_jax.quant.weights import linear_layout

N_INPUTS = 16
PROMPT = 12
GROUP = 64  # divides the tiny 64, 128, 256, 448 input dims; 48, 112, 179 fall back to per channel


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    cfg.vision.image_size = 56
    module = vla_lib.from_config(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    init = jax.jit(
        lambda k: nn.meta.unbox(module.init(k, jnp.zeros((1, 56, 56, 6)), jnp.zeros((1, 4), jnp.int32))["params"])
    )
    params = jax.tree.map(np.asarray, init(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    pv = rng.normal(size=(N_INPUTS, 56, 56, 6)).astype(np.float32)
    ids = rng.integers(1, 32000, size=(N_INPUTS, PROMPT)).astype(np.int32)
    ids[:, 0] = 1
    fp32 = OpenVLA(cfg, params, dtype="float32")
    return cfg, params, pv, ids, fp32.action_token_ids(pv, ids), fp32.logits(pv, ids), fp32


@pytest.fixture(scope="module")
def quantized(tiny):
    cfg, params = tiny[:2]
    return {m: OpenVLA(cfg, params, dtype="float32", quantize=m, group_size=GROUP) for m in quant.MODES}


# ------------------------------------------------------------------------------ the primitives
def test_int4_pack_unpack_is_exact_and_matches_numpy_nibbles():
    rng = np.random.default_rng(1)
    for n in (1, 7, 64, 1001):  # odd counts get one padding nibble
        v = rng.integers(-8, 8, size=n).astype(np.int8)
        packed = np.asarray(quant.pack_int4(v))
        assert packed.dtype == np.int8 and packed.shape == (math.ceil(n / 2),)
        padded = np.concatenate([v, np.zeros(n % 2, np.int8)]).astype(np.uint8)
        ref = (padded[0::2] & 0x0F) | ((padded[1::2] & 0x0F) << 4)  # low nibble = even element
        np.testing.assert_array_equal(packed.view(np.uint8), ref)
        np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, (n,))), v)
    every = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(quant.pack_int4(every), (4, 4))), every)


def test_int8_per_channel_matches_numpy_and_error_is_within_half_a_step():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 16, 96)).astype(np.float32)  # o_proj-like: (heads, head_dim) -> out
    w[:, :, 5] = 0.0  # an all-zero output channel must not divide by zero
    qt = quant.quantize(w, 8, lead=0, in_dims=2)
    k_n = w.reshape(64, 96)
    scale = np.abs(k_n).max(axis=0) / 127
    np.testing.assert_allclose(np.asarray(qt.scale)[0], np.where(scale > 0, scale, 1), rtol=1e-6)
    q = np.asarray(qt.q).reshape(64, 96)
    np.testing.assert_array_equal(q[:, 5], 0)
    assert np.abs(q).max() == 127 and q.dtype == np.int8
    deq = np.asarray(quant.dequantize(qt, jnp.float32))
    step = np.broadcast_to(np.asarray(qt.scale)[0], (64, 96)).reshape(w.shape)
    assert np.all(np.abs(w - deq) <= step / 2 * (1 + 1e-5))
    assert np.abs(w - deq).max() > 0  # it did quantize


def test_int4_grouped_matches_numpy_reference():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 128, 40)).astype(np.float32)  # a scanned stack: lead=1
    qt = quant.quantize(w, 4, lead=1, in_dims=1, group_size=32)
    g = w.reshape(2, 4, 32, 40)
    scale = np.abs(g).max(axis=2, keepdims=True) / 7
    ref = np.clip(np.round(g / scale), -7, 7) * scale
    assert qt.scale.shape == (2, 4, 40) and qt.q.shape == (2 * 128 * 40 // 2,)
    np.testing.assert_allclose(np.asarray(quant.dequantize(qt, jnp.float32)), ref.reshape(w.shape), rtol=1e-6)
    assert np.all(np.abs(w - ref.reshape(w.shape)) <= np.broadcast_to(scale, g.shape).reshape(w.shape) / 2 * 1.00001)
    per_channel = quant.quantize(w, 4, lead=1, group_size=48)  # 48 does not divide 128
    assert per_channel.groups == 1 and per_channel.scale.shape == (2, 1, 40)


def test_which_leaves_are_quantized(tiny):
    params = tiny[1]
    q = quant.quantize_params(params, "int8")
    flat = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(q, is_leaf=quant.weights.is_qtensor)[0]
    }
    qt = {k for k, v in flat.items() if isinstance(v, quant.QTensor)}
    for name in [
        "language_model/layers_0/self_attn/o_proj/kernel",
        "language_model/lm_head/kernel",
        "language_model/layers_1/mlp/down_proj/kernel",
        "projector/fc3/kernel",
        "vision_backbone/featurizer/blocks_2/attn/qkv/kernel",
        "vision_backbone/fused_featurizer/attn_pool/kv/kernel",
    ]:
        assert name in qt, name
    for name in [
        "language_model/embed_tokens/embedding",
        "vision_backbone/featurizer/patch_embed/kernel",
        "projector/fc1/bias",
        "vision_backbone/featurizer/pos_embed",
        "language_model/norm/scale",
    ]:
        assert name in flat and name not in qt, name
    assert flat["language_model/layers_0/self_attn/o_proj/kernel"].in_dims == 2  # (heads, head_dim) in
    assert len(qt) == 2 * 7 + 1 + 3 + 2 * 3 * 4 + 3 + 2  # llama 2x7 + lm_head, projector, 6 ViT blocks, pool
    assert linear_layout(["language_model", "layers", "self_attn", "o_proj", "kernel"], 4) == (1, 2)


# --------------------------------------------------------------------------------- the model
def test_linear_bytes_shrink(tiny, quantized):
    bf16 = quant.param_bytes(jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), tiny[1]))
    r8 = quant.param_bytes(quantized["int8"].params) / bf16
    r4 = quant.param_bytes(quantized["int4"].params) / bf16
    print(f"\nlinear bytes vs bf16: int8 {r8:.3f}, int4 (group {GROUP}) {r4:.3f}")
    assert r8 <= 0.55 and r4 <= 0.30
    assert all(x.dtype == np.int8 for x in jax.tree.leaves(quantized["int4"].params) if x.dtype.itemsize == 1)


@pytest.mark.parametrize(
    "mode, max_err, first_agree, token_agree",
    [
        ("int8", 0.03, 0.9, 0.75),
        ("int4", 0.3, 0.3, 0.2),
    ],
)
def test_quantized_model_tracks_fp32(tiny, quantized, mode, max_err, first_agree, token_agree):
    """Random weights give near-flat logits over 32064 tokens (range ~0.85), so int4's noise flips
    near-ties (measured: int8 1.0 first token / 0.875 all tokens, int4 0.44 / 0.28); the bounds
    are stated for this model, not a trained one, whose logits have real margins."""
    _, _, pv, ids, ref_ids, ref_logits, _ = tiny
    vla = quantized[mode]
    err = float(np.abs(vla.logits(pv, ids) - ref_logits).max())
    got = vla.action_token_ids(pv, ids)
    first = float(np.mean(got[:, 0] == ref_ids[:, 0]))
    tokens = float(np.mean(got == ref_ids))
    print(
        f"\n{mode}: logits max |err| {err:.4f} (fp32 logits max |x| {np.abs(ref_logits).max():.3f}); "
        f"greedy agreement first token {first:.3f}, all 7 tokens {tokens:.3f} over {N_INPUTS} inputs"
    )
    assert 0 < err <= max_err
    assert first >= first_agree and tokens >= token_agree


@pytest.mark.parametrize("mode", quant.MODES)
def test_dequantize_in_the_trace_equals_the_dequantized_float_model(tiny, quantized, mode):
    """The jitted path (int8 at rest, `q * scale` traced next to each use) is exactly the fp32
    model run on the dequantized weights: every disagreement with fp32 is quantization noise."""
    pv, ids, fp32 = tiny[2], tiny[3], tiny[6]
    vla = quantized[mode]
    deq = copy.copy(fp32)  # the fp32 model's compiled functions, on the dequantized weights
    deq.params = quant.dequantize_tree(vla.params, jnp.float32)
    assert quant.quant_mode(deq.params) is None
    np.testing.assert_allclose(vla.logits(pv[:4], ids[:4]), deq.logits(pv[:4], ids[:4]), rtol=0, atol=2e-5)
    np.testing.assert_array_equal(vla.action_token_ids(pv, ids), deq.action_token_ids(pv, ids))


def test_save_load_round_trip(tiny, quantized, tmp_path):
    cfg, _, pv, ids = tiny[:4]
    vla = quantized["int4"]
    out = qckpt.save_quantized(tmp_path / "q4", vla.params, cfg, {"bridge_orig": {"action": {}}}, group_size=GROUP)
    model_config, params, extras = qckpt.load_quantized(out)
    assert extras["mode"] == "int4" and extras["group_size"] == GROUP
    assert model_config.to_dict() == cfg.to_dict()
    saved = jax.tree_util.tree_flatten_with_path(vla.params, is_leaf=quant.weights.is_qtensor)[0]
    loaded = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.weights.is_qtensor)[0])
    assert len(saved) == len(loaded)
    for path, a in saved:
        b = loaded[path]
        assert isinstance(a, quant.QTensor) == isinstance(b, quant.QTensor), path
        for x, y in [(a.q, b.q), (a.scale, b.scale)] if isinstance(a, quant.QTensor) else [(a, b)]:
            assert np.asarray(x).dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), y)
        if isinstance(a, quant.QTensor):
            assert a.metadata() == b.metadata()
    again = OpenVLA.load(out, dtype="float32")
    assert again.quantization == "int4" and again.norm_stats == {"bridge_orig": {"action": {}}}
    np.testing.assert_array_equal(again.logits(pv[:4], ids[:4]), vla.logits(pv[:4], ids[:4]))
    with pytest.raises(ValueError, match="already quantized as 'int4'"):
        OpenVLA.load(out, dtype="float32", quantize="int8")
    with pytest.raises(FileExistsError, match="not empty"):
        qckpt.save_quantized(out, vla.params, cfg)
    with pytest.raises(ValueError, match="without quantized kernels"):
        qckpt.save_quantized(tmp_path / "float", tiny[1], cfg)
    assert not (tmp_path / "float").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"quantize='int3': expected one of \('int8', 'int4'\)"):
        quant.quantize_params({}, "int3")
    with pytest.raises(ValueError, match="group_size=0"):
        quant.quantize(np.ones((8, 4), np.float32), 4, group_size=0)
    with pytest.raises(FileNotFoundError, match="no quant_config.json"):
        qckpt.load_quantized("/nonexistent")


def test_memory_report_tiny_counts_every_leaf(tiny):
    cfg, params = tiny[:2]
    report = quant.memory_report(cfg, GROUP)
    bf16 = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params)
    assert report["bf16"]["total_bytes"] == sum(x.nbytes for x in jax.tree.leaves(bf16))
    assert report["bf16"]["linear_bytes"] == quant.param_bytes(bf16)
    q4 = quant.cast_floats(quant.quantize_params(params, "int4", GROUP), jnp.bfloat16)
    assert report["int4"]["total_bytes"] == quant.total_bytes(q4)
    assert report["int8"]["linear_ratio"] <= 0.55 and report["int4"]["linear_ratio"] <= 0.30


# ------------------------------------------------------------------------------ the benchmark
def test_bench_7b_memory_table():
    """`benchmarks.quant.memory_rows` against the published parameter count of openvla-7b
    (7,541,237,184: 2 bytes each in bf16)."""
    from benchmarks import quant as bench

    mem = {r["variant"]: r for r in bench.memory_rows("7b")}
    assert mem["bf16"]["total_gib"] * 2**30 == 2 * 7_541_237_184
    assert mem["bf16"]["total_ratio"] == 1.0 and mem["int4"]["total_ratio"] < mem["int8"]["total_ratio"] < 0.6
    assert mem["int8"]["linear_ratio"] <= 0.55 and mem["int4"]["linear_ratio"] <= 0.30
    assert "| 7b | int4 |" in bench.format_rows(list(mem.values()))


@pytest.mark.slow  # three decode compiles: ~30 s on 2 shared cores
def test_bench_latency_rows_tiny(tiny):
    """`benchmarks.quant.case_quant` (scripts/bench.py --case quant) on the 56 px tiny model, one batch, one repeat."""
    from benchmarks import quant as bench

    rows = bench.case_quant("tiny", repeats=1, batch_sizes=(2,), model_config=tiny[0])
    assert [(r["variant"], r["batch"]) for r in rows] == [("bf16", 2), ("int8", 2), ("int4", 2)]
    by = {r["variant"]: r for r in rows}
    assert by["bf16"]["ms_vs_bf16"] == 1.0 and by["bf16"]["agree"] == 1.0 and by["bf16"]["linear_ratio"] == 1.0
    assert all(r["ms"] > 0 for r in rows)
    assert by["int8"]["linear_ratio"] <= 0.55 and by["int4"]["linear_ratio"] <= 0.30
    assert by["int4"]["total_bytes"] < by["int8"]["total_bytes"] < by["bf16"]["total_bytes"]
