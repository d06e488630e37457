"""The whole VLA against a PyTorch OpenVLA assembled like the original (timm towers + projector +
transformers Llama), loaded through the HF converter: logits, greedy action ids, bf16 shards."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import model as model_configs
from openvla_jax.convert.hf import load_hf, save_hf
from openvla_jax.models import decoding, vla
from openvla_jax.models.vision import to_nhwc
from tests.support.helpers import max_abs, torch
from tests.support.vla_refs import build_torch_vla, inputs, torch_greedy, torch_logits, valid_positions, write_hf_dir


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    model = build_torch_vla()
    hf_dir = tmp_path_factory.mktemp("hf_fp32")
    write_hf_dir(model, hf_dir)
    pv, ids, mask, lengths = inputs()
    return dict(
        model=model,
        hf_dir=hf_dir,
        pv=pv,
        ids=ids,
        mask=mask,
        lengths=lengths,
        logits=torch_logits(model, pv, ids, mask),
        greedy=torch_greedy(model, pv, ids, lengths),
    )


def jax_logits(cfg, params, pv, ids, mask):
    module = vla.from_config(cfg, dtype=jnp.float32)
    fn = jax.jit(lambda p, x, i, m: module.apply({"params": p}, x, i, m))
    return np.asarray(fn(params, to_nhwc(pv), ids, mask))


def jax_greedy(cfg, params, pv, ids, mask):
    module = vla.from_config(cfg, dtype=jnp.float32)
    fn = jax.jit(lambda p, x, i, m: decoding.greedy_decode(module, p, x, i, m, num_tokens=7))
    return np.asarray(fn(params, to_nhwc(pv), ids, mask))


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_fp32_logits_and_greedy_ids_match_torch(ref, scanned):
    cfg, params, extras = load_hf(ref["hf_dir"], scanned=scanned)
    assert cfg.scan_layers == scanned and extras["norm_stats"]["bridge_orig"]["action"]["mask"][-1] is False
    out = jax_logits(cfg, params, ref["pv"], ref["ids"], ref["mask"])
    assert out.shape == ref["logits"].shape == (2, 10 + 256, 32064)
    lengths = ref["lengths"]
    err = max_abs(valid_positions(out, lengths), valid_positions(ref["logits"], lengths))
    assert err < 1e-4, err
    if not scanned:  # the decode loop is the same code either way; once is enough for the time budget
        ids = jax_greedy(cfg, params, ref["pv"], ref["ids"], ref["mask"])
        np.testing.assert_array_equal(ids, ref["greedy"])


def test_bf16_sharded_checkpoint(ref, tmp_path):
    """fp32 -> bf16 shards (forced into several) -> load: exactly the torch model with bf16-rounded
    weights (1e-4, same greedy ids), and within a stated tolerance of the fp32 model.

    Stated tolerance vs the fp32 torch model: 1% of the logit range. Measured: 0.0046 on a range of
    1.69 (0.27%)."""
    t = torch()
    cfg, params, _ = load_hf(ref["hf_dir"])
    out_dir = tmp_path / "bf16"
    save_hf(out_dir, cfg, params, dtype="bfloat16", max_shard_size="150KB")
    shards = sorted(p.name for p in out_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    cfg16, params16, _ = load_hf(out_dir)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params16))

    # The torch reference with the same bf16-rounded weights, run in fp32.
    rounded = build_torch_vla()
    rounded.load_state_dict({k: v.to(t.bfloat16).to(t.float32) for k, v in ref["model"].state_dict().items()})
    pv, ids, mask, lengths = ref["pv"], ref["ids"], ref["mask"], ref["lengths"]
    want = torch_logits(rounded, pv, ids, mask)
    out = jax_logits(cfg16, params16, pv, ids, mask)
    assert max_abs(valid_positions(out, lengths), valid_positions(want, lengths)) < 1e-4
    np.testing.assert_array_equal(jax_greedy(cfg16, params16, pv, ids, mask), torch_greedy(rounded, pv, ids, lengths))
    full = valid_positions(ref["logits"], lengths)
    err = max_abs(valid_positions(out, lengths), full)
    assert err < 0.01 * float(np.ptp(full)), (err, float(np.ptp(full)))


def test_7b_parameter_count():
    config = model_configs.get_config("7b")
    module = vla.from_config(config, scan_layers=True)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 6)), jnp.ones((1, 4), jnp.int32))
    )["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 7_541_237_184
