"""The Flax ViT against timm (DINOv2 reg4 and SigLIP So400m at tiny size, random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from openvla_jax.models import vit
from tests.support.helpers import max_abs, timm, torch
from tests.support.vision_refs import (
    DINO,
    DINO_NOREG,
    SIGLIP,
    flax_params,
    images,
    second_to_last,
    timm_tower,
    tower_config,
)

TOWERS = {"dino": (DINO, 0), "siglip": (SIGLIP, 1), "dino_noreg": (DINO_NOREG, 2)}


@pytest.fixture(scope="module")
def towers():
    return {name: timm_tower(tower, seed) for name, (tower, seed) in TOWERS.items()}


def nchw(x):
    return torch().tensor(x).permute(0, 3, 1, 2)


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("name", ["dino", "siglip", "dino_noreg"])
def test_second_to_last_block_matches_timm(towers, name, scanned):
    tower, model = TOWERS[name][0], towers[name]
    x = images(2)
    module = vit.ViT(tower_config(tower), scan_layers=scanned)
    got = jax.jit(lambda p, x: module.apply({"params": p}, x, method=vit.ViT.features))(
        flax_params(model, tower, scanned), x
    )
    ref = second_to_last(model, nchw(x)).numpy()
    assert got.shape == ref.shape == (2, 256, tower.embed_dim)
    assert max_abs(got, ref) < 1e-4


@pytest.mark.parametrize("name", ["dino", "siglip"])
def test_every_block_final_norm_and_pool_match_timm(towers, name):
    tower, model = TOWERS[name][0], towers[name]
    t = torch()
    x = images(2, seed=1)
    out = vit.ViT(tower_config(tower)).apply({"params": flax_params(model, tower, False)}, x, return_blocks=True)
    with t.no_grad():
        final, blocks = model.forward_intermediates(nchw(x), return_prefix_tokens=True, output_fmt="NLC")
        pooled = model.forward_head(final).numpy()
    p = model.num_prefix_tokens
    assert out["blocks"].shape[0] == tower.depth
    for i, block in enumerate(blocks):  # (patches, prefix) pairs only when there are prefix tokens
        ref = t.cat([block[1], block[0]], dim=1).numpy() if p else block.numpy()
        assert max_abs(out["blocks"][i], ref) < 1e-4, f"block {i}"
    assert max_abs(out["encoded"], final.numpy()) < 1e-4
    if name == "siglip":  # SigLIP's attention-pool head ("map"), kept though OpenVLA does not use it
        assert max_abs(out["pooled"], pooled) < 1e-4
    else:
        assert "pooled" not in out


def _count_dots(jaxpr) -> int:
    """dot_general equations in a jaxpr, scan bodies counted once per iteration."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            n += 1
        reps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                n += reps * _count_dots(inner)
            elif hasattr(v, "eqns"):
                n += reps * _count_dots(v)
    return n


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_featurizer_skips_the_last_block(towers, scanned):
    """The featurizer's graph has one block's worth fewer matmuls than the full forward."""
    tower = DINO
    module = vit.ViT(tower_config(tower), scan_layers=scanned)
    params = flax_params(towers["dino"], tower, scanned)
    x = jnp.zeros((1, 224, 224, 3))
    feats = jax.make_jaxpr(lambda p: module.apply({"params": p}, x, method=vit.ViT.features))(params).jaxpr
    full = jax.make_jaxpr(lambda p: module.apply({"params": p}, x)["encoded"])(params).jaxpr
    per_block = 6  # qkv, q.k, attn.v, proj, fc1, fc2
    assert _count_dots(full) - _count_dots(feats) == per_block
    assert _count_dots(feats) == per_block * (tower.depth - 1)  # the patch embedding is a conv, not a dot


@pytest.mark.parametrize(
    "model_id,expected",
    [
        ("vit_large_patch14_reg4_dinov2.lvd142m", 303_230_976),
        ("vit_so400m_patch14_siglip_224", 427_680_704),
    ],
)
def test_full_size_parameter_counts(model_id, expected):
    module = vit.ViT(vit.vit_config(model_id))
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert vit.count_params(shapes["params"]) == expected


@pytest.mark.parametrize(
    "model_id,img",
    [
        ("vit_large_patch14_reg4_dinov2.lvd142m", 224),
        ("vit_large_patch14_dinov2.lvd142m", 224),
        ("vit_so400m_patch14_siglip_224", 224),
        ("vit_so400m_patch14_siglip_384", 384),
        ("vit_base_patch16_siglip_224", 224),
    ],
)
def test_registry_matches_timm_architectures(model_id, img):
    """Every registered id: same tensor names and shapes as timm's model (built on the meta device)."""
    t = torch()
    with t.device("meta"):
        ref = timm().create_model(model_id, pretrained=False, num_classes=0, img_size=img)
    ref_shapes = {k.replace(".gamma", ".scale_factor"): tuple(v.shape) for k, v in ref.state_dict().items()}
    from openvla_jax.convert.vision import vit_specs

    cfg = vit.vit_config(model_id, img_size=img)
    assert {s.hf_key: s.hf_shape for s in vit_specs(cfg, scanned=False)} == ref_shapes
    module = vit.ViT(cfg)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, img, img, 3))))
    assert vit.count_params(shapes["params"]) == sum(int(np.prod(s)) for s in ref_shapes.values())


def test_overrides_follow_timm_mlp_width():
    """timm sizes the MLP as int(embed_dim * mlp_ratio) after overrides (So400m: 4304; tiny 48: 179)."""
    assert vit.vit_config("vit_so400m_patch14_siglip_224").mlp_dim == 4304
    assert tower_config(SIGLIP).mlp_dim == int(48 * 3.7362) == 179
    ref = timm_tower(SIGLIP, 0)
    assert ref.blocks[0].mlp.fc1.out_features == 179 and ref.attn_pool.mlp.fc1.out_features == 179
    with pytest.raises(ValueError, match="vit_large_patch14_reg4_dinov2"):
        vit.vit_config("vit_huge_patch14_unknown")


@pytest.mark.parametrize("new_grid", [(8, 8), (18, 18), (12, 20)])
def test_resample_pos_embed_matches_timm(new_grid):
    t = torch()
    from timm.layers import resample_abs_pos_embed

    pos = np.random.default_rng(0).standard_normal((1, 256, 32)).astype(np.float32)
    ref = resample_abs_pos_embed(t.tensor(pos), new_size=list(new_grid), old_size=[16, 16], num_prefix_tokens=0)
    got = vit.resample_pos_embed(jnp.asarray(pos), (16, 16), new_grid)
    assert got.shape == (1, new_grid[0] * new_grid[1], 32)
    assert max_abs(got, ref.numpy()) < 1e-5


@pytest.mark.parametrize("name,img_size", [("dino", 112), ("dino", 252), ("dino_noreg", 252)])
def test_other_image_size_resamples_pos_embed_like_timm(name, img_size):
    """A 224-grid checkpoint run at another size: timm's dynamic_img_size resamples the same way."""
    t = torch()
    tower = TOWERS[name][0]
    model = timm_tower(tower, 3, dynamic_img_size=True)
    x = images(1, size=img_size, seed=2)
    got = vit.ViT(tower_config(tower)).apply({"params": flax_params(model, tower, False)}, x)["encoded"]
    with t.no_grad():
        ref = model.forward_features(nchw(x)).numpy()
    prefix = tower_config(tower).num_prefix_tokens
    assert got.shape == ref.shape == (1, prefix + (img_size // 14) ** 2, tower.embed_dim)
    assert max_abs(got, ref) < 1e-4


def test_bf16_compute_and_remat_scan(towers):
    tower, model = SIGLIP, towers["siglip"]
    x = images(1, seed=3)
    ref = vit.ViT(tower_config(tower)).apply({"params": flax_params(model, tower, False)}, x, method=vit.ViT.features)
    scanned = flax_params(model, tower, True)
    remat = vit.ViT(tower_config(tower), scan_layers=True, remat_policy="full")
    loss = lambda p: jnp.sum(remat.apply({"params": p}, x, method=vit.ViT.features) ** 2)  # noqa: E731
    value, grads = jax.value_and_grad(loss)(scanned)
    assert np.isclose(float(value), float(jnp.sum(ref**2)), rtol=1e-5)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    bf16 = vit.ViT(tower_config(tower), dtype=jnp.bfloat16, scan_layers=True)
    out = bf16.apply({"params": scanned}, x, method=vit.ViT.features)
    assert out.dtype == jnp.bfloat16
    rel = max_abs(out, ref) / float(jnp.max(jnp.abs(ref)))
    assert rel < 0.05


@pytest.mark.parametrize("scanned", [False, True])
def test_every_parameter_has_logical_axis_names(scanned):
    module = vit.ViT(tower_config(SIGLIP), scan_layers=scanned)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    allowed = {None, "embed", "mlp", "heads", "kv", "layers", "pos"}
    for v in leaves:
        assert len(v.names) == v.value.ndim and set(v.names) <= allowed
    blocks = boxed["blocks"] if scanned else boxed["blocks_0"]
    assert blocks["attn"]["qkv"]["kernel"].names == (("layers",) if scanned else ()) + ("embed", None, "heads", "kv")


def test_wrong_image_shape_names_expected_layout():
    module = vit.ViT(tower_config(DINO))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 3, 224, 224))))
