"""State-dict mapping for the vision backbone and projector: completeness, HF names, round trips."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from configs import model as model_configs
from openvla_jax.convert.io import StateDictError
from openvla_jax.convert.mapping import check_flax_params, flax_to_hf, hf_to_flax
from openvla_jax.convert.vision import prismatic_to_hf, prismatic_to_hf_key, vision_specs
from openvla_jax.models import projector as projector_lib
from openvla_jax.models import vision
from tests.support.vision_refs import DINO, SIGLIP, TINY, hf_state, timm_tower


def random_state(specs, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {s.hf_key: rng.standard_normal(s.hf_shape).astype(dtype) for s in specs}


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_exact_including_unused_tensors(scanned, dtype):
    specs = vision_specs(TINY, scanned)
    state = random_state(specs, dtype)
    back = dict(flax_to_hf(specs, hf_to_flax(specs, state)))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    # The tensors OpenVLA never reads are there too.
    last = TINY.vision.fused_featurizer.depth - 1
    for key in (
        f"vision_backbone.fused_featurizer.blocks.{last}.mlp.fc2.weight",
        "vision_backbone.featurizer.norm.weight",
        "vision_backbone.fused_featurizer.attn_pool.kv.weight",
        "vision_backbone.fused_featurizer.attn_pool.latent",
    ):
        assert key in back


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_specs_describe_the_module_parameter_trees(scanned):
    """Flax paths and shapes in the specs are exactly what `init` creates (backbone + projector)."""
    backbone = vision.from_config(TINY, scan_layers=scanned)
    projector = projector_lib.from_config(TINY, backbone.embed_dim)
    vparams = jax.eval_shape(lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 224, 224, 6))))["params"]
    pparams = jax.eval_shape(lambda: projector.init(jax.random.key(0), jnp.zeros((1, 256, backbone.embed_dim))))[
        "params"
    ]
    tree = {"vision_backbone": nn.meta.unbox(vparams), "projector": nn.meta.unbox(pparams)}
    check_flax_params(vision_specs(TINY, scanned), tree)


def test_timm_state_dicts_map_completely():
    """The HF keys are timm's own (with gamma -> scale_factor): nothing extra, nothing missing."""
    state = {
        **hf_state(timm_tower(DINO, 0), "vision_backbone.featurizer."),
        **hf_state(timm_tower(SIGLIP, 1), "vision_backbone.fused_featurizer."),
    }
    specs = [s for s in vision_specs(TINY, scanned=False) if not s.hf_key.startswith("projector.")]
    assert {s.hf_key: s.hf_shape for s in specs} == {k: v.shape for k, v in state.items()}
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in state


def test_7b_specs_match_the_released_checkpoint():
    specs = {s.hf_key: s.hf_shape for s in vision_specs(model_configs.get_config("7b"), scanned=True)}
    total = sum(int(np.prod(s)) for s in specs.values())
    assert total == 303_230_976 + 427_680_704 + 71_385_600
    d, s = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
    expected = {
        d + "cls_token": (1, 1, 1024),
        d + "reg_token": (1, 4, 1024),
        d + "pos_embed": (1, 256, 1024),
        d + "patch_embed.proj.weight": (1024, 3, 14, 14),
        d + "blocks.23.attn.qkv.weight": (3072, 1024),
        d + "blocks.23.mlp.fc1.weight": (4096, 1024),
        d + "blocks.23.ls2.scale_factor": (1024,),
        s + "pos_embed": (1, 256, 1152),
        s + "blocks.26.attn.qkv.weight": (3456, 1152),
        s + "blocks.26.mlp.fc1.weight": (4304, 1152),
        s + "attn_pool.latent": (1, 1, 1152),
        s + "attn_pool.kv.weight": (2304, 1152),
        s + "norm.bias": (1152,),
        "projector.fc1.weight": (8704, 2176),
        "projector.fc2.weight": (4096, 8704),
        "projector.fc3.weight": (4096, 4096),
    }
    for key, shape in expected.items():
        assert specs[key] == shape, key
    assert s + "cls_token" not in specs and s + "blocks.0.ls1.scale_factor" not in specs
    assert len([k for k in specs if k.startswith(d + "blocks.")]) == 24 * 14
    assert len([k for k in specs if k.startswith(s + "blocks.")]) == 27 * 12


def test_prismatic_prefixes_map_to_hf_names():
    assert (
        prismatic_to_hf_key("dino_featurizer.blocks.3.ls1.gamma")
        == "vision_backbone.featurizer.blocks.3.ls1.scale_factor"
    )
    assert (
        prismatic_to_hf_key("siglip_featurizer.attn_pool.kv.bias")
        == "vision_backbone.fused_featurizer.attn_pool.kv.bias"
    )
    assert prismatic_to_hf_key("projector.0.weight") == "projector.fc1.weight"
    assert prismatic_to_hf_key("projector.2.bias") == "projector.fc2.bias"
    assert prismatic_to_hf_key("projector.4.weight") == "projector.fc3.weight"
    assert prismatic_to_hf_key("llm.model.norm.weight") == "language_model.model.norm.weight"
    assert prismatic_to_hf_key("featurizer.pos_embed", fused=False) == "vision_backbone.featurizer.pos_embed"
    # A whole Prismatic-keyed tiny state dict loads through the HF specs.
    specs = vision_specs(TINY, scanned=False)
    hf = random_state(specs, np.float32)
    to_prismatic = {
        "vision_backbone.featurizer.": "dino_featurizer.",
        "vision_backbone.fused_featurizer.": "siglip_featurizer.",
        "projector.fc1.": "projector.0.",
        "projector.fc2.": "projector.2.",
        "projector.fc3.": "projector.4.",
    }
    prismatic = {}
    for k, v in hf.items():
        for new, old in to_prismatic.items():
            if k.startswith(new):
                k = old + k[len(new) :]
                break
        prismatic[k.replace("scale_factor", "gamma")] = v
    renamed = prismatic_to_hf(prismatic)
    assert set(renamed) == set(hf) and all(renamed[k] is hf[k] for k in hf)


def test_missing_or_misshapen_tensors_are_named():
    specs = vision_specs(TINY, scanned=False)
    state = random_state(specs, np.float32)
    del state["vision_backbone.fused_featurizer.attn_pool.q.bias"]
    with pytest.raises(StateDictError, match="attn_pool.q.bias"):
        hf_to_flax(specs, state)
    state = random_state(specs, np.float32)
    state["projector.fc1.weight"] = state["projector.fc1.weight"].T
    with pytest.raises(StateDictError, match="projector.fc1.weight"):
        hf_to_flax(specs, state)
