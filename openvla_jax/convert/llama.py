"""HF `LlamaForCausalLM` state dict <-> `openvla_jax.models.llama.Llama` params.

HF keys: `model.embed_tokens.weight`, `model.layers.N.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.N.mlp.{gate,up,down}_proj.weight`, `model.layers.N.{input,post_attention}_layernorm.weight`,
`model.norm.weight`, `lm_head.weight`; in OpenVLA they sit under the prefix `language_model.`.
"""

from __future__ import annotations

from typing import cast

import flax.linen as nn
import numpy as np

from openvla_jax.convert.io import open_state_dict, write_safetensors
from openvla_jax.convert.mapping import ParamSpec, flatten_params, hf_getter, hf_to_flax
from openvla_jax.models.llama import LlamaConfig


def llama_specs(config: LlamaConfig, scanned: bool, prefix: str = "") -> list[ParamSpec]:
    c = config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h, dh = c.num_attention_heads, c.head_dim
    k = cast(int, c.num_key_value_heads)  # never None after LlamaConfig.__post_init__
    specs = [ParamSpec(f"{prefix}model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, d), (v, d))]
    per_layer = [
        # (hf name, flax path inside the layer, hf shape, flax shape, kind)
        ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (h * dh, d), (d, h, dh), "linear"),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (k * dh, d), (d, k, dh), "linear"),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (k * dh, d), (d, k, dh), "linear"),
        ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (d, h * dh), (h, dh, d), "linear"),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f, d), (d, f), "linear"),
        ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f, d), (d, f), "linear"),
        ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d, f), (f, d), "linear"),
        ("input_layernorm.weight", ("input_layernorm", "scale"), (d,), (d,), "copy"),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (d,), (d,), "copy"),
    ]
    for i in range(c.num_hidden_layers):
        for name, path, hf_shape, flax_shape, kind in per_layer:
            key = f"{prefix}model.layers.{i}.{name}"
            if scanned:
                specs.append(ParamSpec(key, ("layers",) + path, hf_shape, flax_shape, kind, i, c.num_hidden_layers))
            else:
                specs.append(ParamSpec(key, (f"layers_{i}",) + path, hf_shape, flax_shape, kind))
    specs.append(ParamSpec(f"{prefix}model.norm.weight", ("norm", "scale"), (d,), (d,)))
    specs.append(ParamSpec(f"{prefix}lm_head.weight", ("lm_head", "kernel"), (v, d), (d, v), "linear"))
    return specs


def load_hf_llama(path, config: LlamaConfig, scanned: bool = False, prefix: str = "") -> dict:
    """Read HF Llama safetensors (file or directory) into a Flax params dict (numpy leaves)."""
    reader = open_state_dict(path)
    return hf_to_flax(llama_specs(config, scanned, prefix), reader, str(path), shapes=reader.shapes)


def save_hf_llama(params, config: LlamaConfig, path, scanned: bool = False, prefix: str = "") -> None:
    """Write Flax Llama params as one HF-keyed safetensors file, one tensor in memory at a time."""
    params = nn.meta.unbox(params)
    specs = llama_specs(config, scanned, prefix)
    get = hf_getter(specs, params)
    flat = flatten_params(params)
    entries = [(s.hf_key, s.hf_shape, np.dtype(flat[s.path].dtype)) for s in specs]
    write_safetensors(path, entries, get, {"format": "pt"})
