"""Llama 2 in Flax against transformers.LlamaForCausalLM, and the HF <-> Flax state-dict mapping."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from configs import model as model_configs
from openvla_jax.convert.io import StateDictError, open_state_dict, save_state_dict
from openvla_jax.convert.llama import llama_specs, load_hf_llama, save_hf_llama
from openvla_jax.convert.mapping import hf_to_flax
from openvla_jax.models import llama
from openvla_jax.testing.torch_compat import transformers_llama
from tests.support.helpers import max_abs

TINY = llama.LlamaConfig.from_dict(model_configs.get_config("tiny").llm)


def hf_model(config: llama.LlamaConfig, seed=0):
    """A random transformers Llama with non-trivial norm weights (so a norm mix-up shows)."""
    import torch as t

    t.manual_seed(seed)
    model = transformers_llama(config)
    with t.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * t.randn_like(p))
    return model


def write_hf(model, path, dtype=None):
    import torch as t
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file(sd, str(path))
    return {k: v.float().numpy() if v.dtype == t.bfloat16 else v.numpy() for k, v in sd.items()}


def batch(config, b=3, t=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, size=(b, t)).astype(np.int32)
    lengths = np.array([t, t - 5, t - 9])[:b]
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)  # right padding
    return tokens, mask, lengths


def hf_logits(model, tokens, mask):
    import torch as t

    with t.no_grad():
        return model(input_ids=t.tensor(tokens, dtype=t.long), attention_mask=t.tensor(mask)).logits.numpy()


def flax_logits(config, params, tokens, mask, **kw):
    module = llama.Llama(config, **kw)
    logits, _ = jax.jit(lambda p, x, m: module.apply({"params": p}, x, attention_mask=m))(params, tokens, mask)
    return np.asarray(logits)


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    model = hf_model(TINY)
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    write_hf(model, path)
    tokens, mask, lengths = batch(TINY)
    return model, path, tokens, mask, lengths, hf_logits(model, tokens, mask)


def valid(x, lengths):
    return np.concatenate([x[i, : lengths[i]] for i in range(len(lengths))])


@pytest.mark.parametrize("scanned", [False, True])
def test_parity_fp32_right_padding(tiny_ref, scanned):
    _, path, tokens, mask, lengths, ref = tiny_ref
    params = load_hf_llama(path, TINY, scanned=scanned)
    out = flax_logits(TINY, params, tokens, mask, scan_layers=scanned)
    assert out.shape == ref.shape == (3, 12, 32064)
    assert max_abs(valid(out, lengths), valid(ref, lengths)) < 1e-4


def test_parity_grouped_kv_heads(tmp_path):
    config = llama.LlamaConfig(**{**TINY.__dict__, "num_key_value_heads": 2, "vocab_size": 512})
    model = hf_model(config, seed=1)
    write_hf(model, tmp_path / "m.safetensors")
    tokens, mask, lengths = batch(config, seed=1)
    params = load_hf_llama(tmp_path / "m.safetensors", config)
    out = flax_logits(config, params, tokens, mask)
    assert max_abs(valid(out, lengths), valid(hf_logits(model, tokens, mask), lengths)) < 1e-4


def test_bf16_compute_within_tolerance(tiny_ref):
    """bf16 activations with fp32 params: logits within 1% of the reference's logit range.

    Measured on this config: max abs error 0.0065 on a logit range of 1.52 (0.43%)."""
    _, path, tokens, mask, lengths, ref = tiny_ref
    params = load_hf_llama(path, TINY)
    out = flax_logits(TINY, params, tokens, mask, dtype=jnp.bfloat16)
    err = max_abs(valid(out, lengths), valid(ref, lengths))
    scale = float(np.ptp(valid(ref, lengths)))
    assert err < 0.01 * scale, (err, scale)
    # and the greedy next tokens agree almost everywhere
    agree = np.mean(valid(out, lengths).argmax(-1) == valid(ref, lengths).argmax(-1))
    assert agree > 0.9


@pytest.mark.parametrize("impl", ["dpa"])
def test_attention_impl_matches_xla(tiny_ref, impl):
    _, path, tokens, mask, lengths, ref = tiny_ref
    params = load_hf_llama(path, TINY)
    out = flax_logits(TINY, params, tokens, mask, attention_impl=impl)
    assert max_abs(valid(out, lengths), valid(ref, lengths)) < 1e-4


@pytest.mark.parametrize("scanned", [False, True])
def test_kv_cache_decoding_matches_full_forward(tiny_ref, scanned):
    """Prefill a right-padded batch, then feed each row's next tokens one at a time at its own
    position; every step's logits equal the full forward pass at that position."""
    _, path, tokens, _, _, _ = tiny_ref
    params = load_hf_llama(path, TINY, scanned=scanned)
    module = llama.Llama(TINY, scan_layers=scanned)
    b, total = tokens.shape
    prompt_lens = np.array([5, 3, 7])
    steps = 4
    full, _ = module.apply({"params": params}, tokens)  # causal, no padding

    prompt_len = prompt_lens.max()
    prompt = np.where(np.arange(prompt_len)[None] < prompt_lens[:, None], tokens[:, :prompt_len], 0)
    slots = prompt_len + steps
    cache = llama.init_cache(TINY, b, slots)
    kv_valid = np.zeros((b, slots), bool)
    kv_valid[:, :prompt_len] = np.arange(prompt_len)[None] < prompt_lens[:, None]
    step = jax.jit(
        lambda p, x, pos, m, c, i: module.apply(
            {"params": p}, x, positions=pos, attention_mask=m, cache=c, cache_index=i
        )
    )
    logits, cache = step(params, prompt, np.broadcast_to(np.arange(prompt_len), (b, prompt_len)), kv_valid, cache, 0)
    for i in range(b):
        assert max_abs(logits[i, prompt_lens[i] - 1], full[i, prompt_lens[i] - 1]) < 1e-4
    for s in range(steps):
        slot = prompt_len + s
        kv_valid[:, slot] = True
        pos = prompt_lens + s
        x = tokens[np.arange(b), pos][:, None]
        logits, cache = step(params, x, pos[:, None], kv_valid, cache, slot)
        for i in range(b):
            assert max_abs(logits[i, 0], full[i, pos[i]]) < 1e-4, (s, i)


def test_scanned_and_unscanned_layouts_agree(tiny_ref):
    _, path, tokens, mask, lengths, _ = tiny_ref
    a = flax_logits(TINY, load_hf_llama(path, TINY, scanned=False), tokens, mask, scan_layers=False)
    b = flax_logits(TINY, load_hf_llama(path, TINY, scanned=True), tokens, mask, scan_layers=True, remat_policy="full")
    assert max_abs(valid(a, lengths), valid(b, lengths)) < 1e-5


def test_remat_and_scan_give_same_gradients(tiny_ref):
    _, path, tokens, mask, _, _ = tiny_ref
    grads = []
    for scanned, policy in [(False, "none"), (True, "dots")]:
        params = load_hf_llama(path, TINY, scanned=scanned)
        module = llama.Llama(TINY, scan_layers=scanned, remat_policy=policy)
        loss = lambda p: jnp.mean(module.apply({"params": p}, tokens, attention_mask=mask)[0] ** 2)  # noqa: E731
        g = jax.jit(jax.grad(loss))(params)
        grads.append(g)
    # compare layer 1's q_proj gradient across layouts
    assert (
        max_abs(
            grads[0]["layers_1"]["self_attn"]["q_proj"]["kernel"],
            grads[1]["layers"]["self_attn"]["q_proj"]["kernel"][1],
        )
        < 1e-6
    )
    assert max_abs(grads[0]["embed_tokens"]["embedding"], grads[1]["embed_tokens"]["embedding"]) < 1e-6


def test_7b_parameter_count_without_allocating():
    config = model_configs.get_config("7b")
    module = llama.from_config(config, scan_layers=True)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    leaves = jax.tree.leaves(nn.meta.unbox(shapes))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 6_738_939_904


def test_logical_axis_names_on_every_param():
    module = llama.Llama(TINY, scan_layers=True)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    specs = nn.get_partition_spec(boxed)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    names = {jax.tree_util.keystr(k): tuple(v) for k, v in flat}
    assert names["['layers']['self_attn']['q_proj']['kernel']"] == ("layers", "embed", "heads", "kv")
    assert names["['layers']['mlp']['down_proj']['kernel']"] == ("layers", "mlp", "embed")
    assert names["['embed_tokens']['embedding']"] == ("vocab", "embed")
    assert names["['lm_head']['kernel']"] == ("embed", "vocab")
    assert all(len(v) > 0 for v in names.values())


@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise(tmp_path, scanned, dtype):
    import torch as t

    model = hf_model(TINY, seed=2)
    src = tmp_path / "in.safetensors"
    write_hf(model, src, dtype=getattr(t, dtype))
    params = load_hf_llama(src, TINY, scanned=scanned)
    save_hf_llama(params, TINY, tmp_path / "out.safetensors", scanned=scanned)
    a, b = open_state_dict(src), open_state_dict(tmp_path / "out.safetensors")
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype == (ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), k


def test_bad_state_dicts_list_the_keys(tmp_path):
    specs = llama_specs(TINY, scanned=False)
    sd = {s.hf_key: np.zeros(s.hf_shape, np.float32) for s in specs}
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.7.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)
    sd["model.norm.weight"] = np.zeros((65,), np.float32)
    save_state_dict(tmp_path / "bad.safetensors", sd)
    with pytest.raises(StateDictError) as e:
        load_hf_llama(tmp_path / "bad.safetensors", TINY)
    msg = str(e.value)
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1): model.layers.7.self_attn.q_proj.weight" in msg
    assert "model.norm.weight (expected (64,), got (65,))" in msg
    # and the Flax -> HF direction checks the tree too
    params = hf_to_flax(specs, {s.hf_key: np.zeros(s.hf_shape, np.float32) for s in specs})
    del params["layers_0"]["mlp"]
    with pytest.raises(StateDictError, match="layers_0/mlp/gate_proj/kernel"):
        save_hf_llama(params, TINY, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="never loads pickled"):
        open_state_dict(tmp_path)
