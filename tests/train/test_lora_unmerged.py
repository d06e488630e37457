"""LoRA inside the forward pass (`lora.adapted`): the unmerged model equals the merged one (logits,
loss, gradients of A and B) in fp32, scanned or not; the compiled step never forms a kernel-sized
gradient of a frozen weight, and its temporaries are a fraction of a full fine-tuning step's; a
quantized frozen base (`quant/frozen.py`) runs as its dequantized weights would."""

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from openvla_jax.models import kernels as K
from openvla_jax.models import vla
from openvla_jax.quant import frozen as QF
from openvla_jax.quant import weights as QW
from openvla_jax.train import lora as LO
from openvla_jax.train import step as ST
from tests.support import helpers
from tests.train.test_lora import BASE, BATCH, CFG, MODULE, SHAPES, make_batch

SUPERVISED = 8
RANK = LO.LoraConfig(rank=4, alpha=8.0)
ROWS3 = make_batch(b=3)


def random_adapters(shapes, cfg, seed=1):
    """Adapters with B != 0 (scaled so the deltas are comparable to the weights)."""
    ad = LO.init_lora(shapes, cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {
        p: {"A": np.asarray(v["A"]), "B": (0.05 * rng.normal(size=v["B"].shape)).astype(np.float32)}
        for p, v in ad.items()
    }


def merged_and_unmerged(module, base, adapters, cfg, batch):
    """-> ((loss, logits, grads) merged, the same unmerged): grads of the summed loss in A and B."""
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])

    def loss(adapters, merged):
        if merged:
            p = LO.merge(base, adapters, cfg)
            return ST.forward_sums(module, p, batch, supervised_tokens=SUPERVISED)[0], module.apply(
                {"params": p}, *args
            )
        with LO.adapted(cfg):
            p = LO.attach(base, adapters)
            return ST.forward_sums(module, p, batch, supervised_tokens=SUPERVISED)[0], module.apply(
                {"params": p}, *args
            )

    out = []
    for merged in (True, False):
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1, compiler_options=ST.FAST_COMPILE)
        (value, logits), grads = fn(adapters, merged)
        out.append((float(value), np.asarray(logits), grads))
    return out


@pytest.mark.parametrize("scanned", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_unmerged_equals_merged_logits_loss_and_adapter_gradients(scanned):
    if scanned:  # stacked kernels: A `[L, in, r]`, B `[L, r, out]` sliced per layer by nn.scan
        module = vla.from_config(CFG, dtype=jnp.float32, scan_layers=True)
        base = helpers.random_params(module, 0)
    else:
        module, base = MODULE, BASE
    shapes = nn.meta.unbox(ST.abstract_params(module))
    ad = random_adapters(shapes, RANK)
    if scanned:
        assert ad["language_model/layers/mlp/up_proj/kernel"]["A"].shape == (2, 64, 4)
    (l_m, x_m, g_m), (l_u, x_u, g_u) = merged_and_unmerged(module, base, ad, RANK, BATCH)
    ref = np.asarray(module.apply({"params": base}, BATCH["pixel_values"], BATCH["input_ids"], BATCH["attention_mask"]))
    assert np.abs(x_m - ref).max() > 0.05  # the adapters matter
    np.testing.assert_allclose(x_u, x_m, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(l_u, l_m, rtol=1e-5)
    assert g_u.keys() == g_m.keys() == ad.keys()
    worst = 0.0
    for p in ad:
        for k in ("A", "B"):
            a, b = np.asarray(g_u[p][k]), np.asarray(g_m[p][k])
            scale = max(np.abs(b).max(), 1e-3)
            worst = max(worst, float(np.abs(a - b).max() / scale))
    print(f"\nunmerged vs merged: loss {l_u:.6f} vs {l_m:.6f}; worst gradient difference / max |grad|: {worst:.1e}")
    assert worst < 1e-3


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (pjit, scan, remat, custom_vjp, ...)."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jex_core.Jaxpr):
                    yield from _eqns(inner)


def dot_output_shapes(fn, *args) -> set:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return {tuple(v.aval.shape) for e in _eqns(jaxpr) if e.primitive.name == "dot_general" for v in e.outvars}


def test_no_kernel_sized_gradient_of_a_frozen_weight():
    """The jaxpr of the step's gradient computes no dot whose result has a frozen kernel's shape (a dW
    would), for every adapted kernel; the merged formulation it replaces does (the check can fail)."""
    cfg = RANK
    ad = LO.init_lora(SHAPES, cfg, jax.random.key(0))
    kernels = set()
    for path, shape in LO.targets(SHAPES, cfg).items():  # as stored, and as a [K, N] matrix
        kernels |= {tuple(shape), K.kernel_layout(path.split("/"), shape).matrix_shape(shape)}

    def grads(merged):
        def loss(adapters, base):
            if merged:
                p = LO.merge(base, adapters, cfg)
                return ST.forward_sums(MODULE, p, ROWS3, supervised_tokens=SUPERVISED)[0]
            with LO.adapted(cfg):
                return ST.forward_sums(MODULE, LO.attach(base, adapters), ROWS3, supervised_tokens=SUPERVISED)[0]

        return lambda adapters, base: jax.grad(loss)(adapters, jax.lax.stop_gradient(base))

    # 3 rows: no activation `[B, patches, D]` can look like an o_proj kernel `[H, Dh, D]` (4, 16, 64)
    unmerged = dot_output_shapes(grads(False), ad, BASE)
    merged = dot_output_shapes(grads(True), ad, BASE)
    assert merged & kernels, "the merged step's dW = x^T dy should show up as a kernel-shaped dot"
    assert not unmerged & kernels, sorted(unmerged & kernels)


@pytest.mark.slow  # two compiles of a tiny step: ~30-75 s on 2 shared cores (the jaxpr check above is the fast one)
def test_compiled_lora_step_temporaries_are_a_fraction_of_full_fine_tuning():
    """Compiled memory of one step of the tiny model (one CPU device): LoRA's temporaries (activations,
    adapter gradients) against a full fine-tuning step's (a gradient for every parameter)."""
    import optax

    from openvla_jax.parallel.mesh import single_device_mesh

    mesh = single_device_mesh()
    tx = optax.adam(1e-3)
    full = ST.make_train_step(
        MODULE, tx, lambda s: 1e-3, mesh, supervised_tokens=SUPERVISED, compiler_options=ST.FAST_COMPILE
    )
    state = ST.abstract_train_state(MODULE, tx, full.shardings)
    batch = ST.abstract_batch(MODULE, mesh, 4, 14)
    full_mem = ST.lower_train_step(full, state, batch, mesh).compile().memory_analysis()

    lora = LO.make_lora_train_step(
        MODULE, tx, lambda s: 1e-3, RANK, mesh=mesh, supervised_tokens=SUPERVISED, compiler_options=ST.FAST_COMPILE
    )
    lstate = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(lambda: LO.init_lora_state(SHAPES, RANK, tx, jax.random.key(0))),
        lora.shardings,
    )
    base = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), SHAPES, lora.base_shardings)
    lora_mem = lora.lower(lstate, base, batch).compile().memory_analysis()
    print(
        f"\ntiny model, 4 rows: temporaries LoRA {lora_mem.temp_size_in_bytes / 2**20:.1f} MiB, "
        f"full fine-tuning {full_mem.temp_size_in_bytes / 2**20:.1f} MiB"
    )
    assert lora_mem.temp_size_in_bytes < 0.5 * full_mem.temp_size_in_bytes


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_frozen_linear_is_the_dequantized_matmul_and_its_input_gradient(mode):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 64, 4, 16)).astype(np.float32)  # a scanned q_proj: [L, D, H, Dh]
    x = rng.normal(size=(3, 5, 64)).astype(np.float32)
    qt = QW.quantize(w, 8 if mode == "int8" else 4, 1, 1, 32)
    entry = QF._entry(jax.tree.map(np.asarray, qt))
    assert entry[mode].shape[0] == 2  # the scan axis leads every leaf
    ref_w = np.asarray(QW.dequantize(qt, jnp.float32))
    for layer in range(2):
        one = jax.tree.map(lambda a: a[layer], entry)  # what nn.scan hands one layer
        y = QF.frozen_linear(jnp.asarray(x), one, 1, (4, 16), jnp.float32)
        np.testing.assert_allclose(np.asarray(y), np.einsum("btd,dhk->bthk", x, ref_w[layer]), rtol=1e-5, atol=1e-5)
        g = jax.grad(lambda x: (QF.frozen_linear(x, one, 1, (4, 16), jnp.float32) ** 2).sum())(jnp.asarray(x))
        g_ref = jax.grad(lambda x: (jnp.einsum("btd,dhk->bthk", x, ref_w[layer]) ** 2).sum())(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", [pytest.param("int8", marks=pytest.mark.slow), "int4"])
def test_adapted_model_on_a_quantized_base_is_the_dequantized_model(mode):
    """Logits of the adapted model on the int8 / int4 base equal those of the same adapters merged into
    the dequantized base; the base's abstract shapes and shardings describe what `frozen_base` makes."""
    cfg = RANK
    ad = random_adapters(SHAPES, cfg)
    q = LO.frozen_base(BASE, cfg, jnp.float32, quant=mode, group_size=32)
    assert QF.is_frozen_quant(q["language_model"]["lm_head"]["kernel"])
    abstract = LO.abstract_base(SHAPES, cfg, jnp.float32, mode, 32)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), q)
    deq = QF.dequantize_frozen(q, jnp.float32, SHAPES)
    args = (BATCH["pixel_values"], BATCH["input_ids"], BATCH["attention_mask"])
    got = jax.jit(lambda q, ad: LO.adapted_apply(MODULE, q, ad, cfg, *args), compiler_options=ST.FAST_COMPILE)(q, ad)
    want = jax.jit(lambda p: MODULE.apply({"params": p}, *args), compiler_options=ST.FAST_COMPILE)(
        LO.merge(deq, ad, cfg)
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-4, rtol=1e-4)
