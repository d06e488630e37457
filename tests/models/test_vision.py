"""Fused DINOv2 + SigLIP backbone and the projectors against a PyTorch reference built like
Prismatic's `PrismaticVisionBackbone` / `FusedMLPProjector` from two timm models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import model as model_configs
from openvla_jax.convert.mapping import hf_to_flax
from openvla_jax.convert.vision import vision_specs
from openvla_jax.models import projector as projector_lib
from openvla_jax.models import vision
from tests.support.helpers import max_abs, torch
from tests.support.vision_refs import DINO, SIGLIP, TINY, hf_state, second_to_last, timm_tower


def torch_fused_reference(dino, siglip, pixel_values_nchw):
    """Prismatic: split channels 0-2 / 3-5, each tower's second-to-last block (no norm, no prefix), cat."""
    t = torch()
    img, img_fused = t.split(pixel_values_nchw, [3, 3], dim=1)
    return t.cat([second_to_last(dino, img), second_to_last(siglip, img_fused)], dim=2)


def torch_projector(arch, vision_dim, llm_dim, seed=0):
    t = torch()
    t.manual_seed(seed)
    nn = t.nn
    if arch == "fused-gelu-mlp":
        layers = [
            nn.Linear(vision_dim, 4 * vision_dim),
            nn.GELU(),
            nn.Linear(4 * vision_dim, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        ]
    else:
        layers = [nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)]
    seq = nn.Sequential(*layers).eval()
    fcs = [m for m in seq if isinstance(m, nn.Linear)]
    state = {}
    for i, fc in enumerate(fcs):
        state[f"projector.fc{i + 1}.weight"] = fc.weight.detach().numpy()
        state[f"projector.fc{i + 1}.bias"] = fc.bias.detach().numpy()
    return seq, state


@pytest.fixture(scope="module")
def reference():
    dino, siglip = timm_tower(DINO, 10), timm_tower(SIGLIP, 11)
    vision_dim = DINO.embed_dim + SIGLIP.embed_dim
    proj, proj_state = torch_projector("fused-gelu-mlp", vision_dim, TINY.llm.hidden_size)
    state = {
        **hf_state(dino, "vision_backbone.featurizer."),
        **hf_state(siglip, "vision_backbone.fused_featurizer."),
        **proj_state,
    }
    return dino, siglip, proj, state


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_fused_features_and_projector_match_torch(reference, scanned):
    dino, siglip, proj, state = reference
    t = torch()
    params = hf_to_flax(vision_specs(TINY, scanned), state)
    pv = np.random.default_rng(0).standard_normal((2, 6, 224, 224)).astype(np.float32)  # HF layout
    with t.no_grad():
        ref_feats = torch_fused_reference(dino, siglip, t.tensor(pv))
        ref_proj = proj(ref_feats).numpy()
    backbone = vision.from_config(TINY, dtype=jnp.float32, scan_layers=scanned)
    projector = projector_lib.from_config(TINY, backbone.embed_dim, dtype=jnp.float32)

    @jax.jit
    def run(params, pv):
        feats = backbone.apply({"params": params["vision_backbone"]}, vision.to_nhwc(pv))
        return feats, projector.apply({"params": params["projector"]}, feats)

    feats, projected = run(params, jnp.asarray(pv))
    assert feats.shape == (2, 256, DINO.embed_dim + SIGLIP.embed_dim) == tuple(ref_feats.shape)
    assert max_abs(feats, ref_feats.numpy()) < 1e-4
    # DINOv2 features fill the first 64 columns, SigLIP the rest (order matters for the projector).
    assert max_abs(feats[..., :64], second_to_last(dino, t.tensor(pv[:, :3])).numpy()) < 1e-4
    assert projected.shape == (2, 256, TINY.llm.hidden_size)
    assert max_abs(projected, ref_proj) < 1e-4


def test_single_backbone_gelu_mlp_projector(reference):
    """A single-tower Prismatic (DINOv2 only) with the 2-layer gelu-mlp projector."""
    dino, _, _, _ = reference
    t = torch()
    config = TINY.copy_and_resolve_references()
    config.vision.fused_featurizer = None
    config.projector.arch = "gelu-mlp"
    backbone = vision.from_config(config, dtype=jnp.float32)
    proj, proj_state = torch_projector("gelu-mlp", DINO.embed_dim, config.llm.hidden_size, seed=1)
    params = hf_to_flax(
        vision_specs(config, scanned=False), {**hf_state(dino, "vision_backbone.featurizer."), **proj_state}
    )
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    feats = backbone.apply({"params": params["vision_backbone"]}, x)
    out = projector_lib.from_config(config, backbone.embed_dim, dtype=jnp.float32).apply(
        {"params": params["projector"]}, feats
    )
    with t.no_grad():
        ref = proj(second_to_last(dino, t.tensor(x).permute(0, 3, 1, 2))).numpy()
    assert max_abs(out, ref) < 1e-4
    with pytest.raises(ValueError, match=r"\[B, 224, 224, 3\]"):
        backbone.apply({"params": params["vision_backbone"]}, np.zeros((1, 224, 224, 6), np.float32))


def test_full_size_parameter_counts():
    config = model_configs.get_config("7b")
    backbone = vision.from_config(config)
    assert backbone.embed_dim == 1024 + 1152 == vision.feature_dim(config)
    shapes = jax.eval_shape(lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 224, 224, 6))))["params"]
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(shapes["featurizer"]) == 303_230_976
    assert count(shapes["fused_featurizer"]) == 427_680_704
    projector = projector_lib.from_config(config, backbone.embed_dim)
    pshapes = jax.eval_shape(lambda: projector.init(jax.random.key(0), jnp.zeros((1, 256, 2176))))["params"]
    assert sorted(pshapes) == ["fc1", "fc2", "fc3"]
    assert pshapes["fc1"]["kernel"].value.shape == (2176, 8704)
    assert count(pshapes) == 71_385_600
    out = jax.eval_shape(lambda p, x: backbone.apply({"params": p}, x), shapes, jnp.zeros((2, 224, 224, 6)))
    assert out.shape == (2, 256, 2176)


def test_wrong_layouts_name_the_expected_shape():
    backbone = vision.from_config(TINY)
    with pytest.raises(ValueError, match=r"\[B, 224, 224, 6\].*to_nhwc"):
        backbone.init(jax.random.key(0), jnp.zeros((1, 6, 224, 224)))
    with pytest.raises(ValueError, match=r"\[B, 224, 224, 6\]"):
        backbone.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match=r"\[B, 6, 224, 224\]"):
        vision.to_nhwc(np.zeros((1, 224, 224, 6)), size=224)
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        vision.to_nhwc(np.zeros((1, 3, 224, 224)))
    with pytest.raises(ValueError, match=r"\[\.\.\., 2176\]"):
        projector_lib.Projector(2176, 64).init(jax.random.key(0), jnp.zeros((1, 256, 2048)))
    with pytest.raises(ValueError, match="gelu-mlp"):
        projector_lib.layer_dims("linear", 8, 8)
