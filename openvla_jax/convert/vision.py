"""timm ViT / Prismatic projector state dicts <-> `openvla_jax.models.{vit,vision,projector}` params.

HF OpenVLA keys: `vision_backbone.featurizer.*` (DINOv2), `vision_backbone.fused_featurizer.*`
(SigLIP), `projector.fc{1,2,3}.*`. Tower keys are timm's, except LayerScale's `ls{1,2}.gamma`, which
the HF checkpoint calls `ls{1,2}.scale_factor`. Every tensor is listed, including those OpenVLA never
uses (last block, final norm, SigLIP's `attn_pool`), so a round trip is complete and bit-exact.
Blocks are `blocks_{i}` unscanned, or one stacked `blocks` subtree (axis 0 = block) when scanned.
"""

from __future__ import annotations

from openvla_jax.convert.mapping import ParamSpec
from openvla_jax.models import projector as projector_lib
from openvla_jax.models.config import VLAConfig, as_config
from openvla_jax.models.vision import from_config as backbone_from_config
from openvla_jax.models.vit import ViTConfig

# Original Prismatic training checkpoints -> HF names.
PRISMATIC_PREFIXES = (
    ("dino_featurizer.", "vision_backbone.featurizer."),
    ("siglip_featurizer.", "vision_backbone.fused_featurizer."),
    ("projector.0.", "projector.fc1."),
    ("projector.2.", "projector.fc2."),
    ("projector.4.", "projector.fc3."),
    ("llm.", "language_model."),
)


def prismatic_to_hf_key(key: str, fused: bool = True) -> str:
    """Rename one key of a Prismatic checkpoint (`dino_featurizer.`, `siglip_featurizer.`,
    `projector.{0,2,4}.`, `llm.`) to its HF OpenVLA name; LayerScale `gamma` -> `scale_factor`.
    Single-backbone checkpoints (`fused=False`) use `featurizer.`; their gelu-mlp projector has
    `projector.{0,2}`, which map to fc1/fc2 as well."""
    if not fused and key.startswith("featurizer."):
        key = "vision_backbone." + key
    for old, new in PRISMATIC_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    for ls in ("ls1", "ls2"):
        key = key.replace(f".{ls}.gamma", f".{ls}.scale_factor")
    return key


def prismatic_to_hf(state: dict, fused: bool = True) -> dict:
    """A Prismatic state dict with every key renamed by `prismatic_to_hf_key` (values untouched)."""
    out = {}
    for k, v in state.items():
        new = prismatic_to_hf_key(k, fused)
        if new in out:
            raise ValueError(f"two Prismatic keys map to {new!r}")
        out[new] = v
    return out


def _block_entries(c: ViTConfig):
    d, h, dh, f = c.embed_dim, c.num_heads, c.head_dim, c.mlp_dim
    e = [
        ("norm1.weight", ("norm1", "scale"), (d,), (d,), "copy"),
        ("norm1.bias", ("norm1", "bias"), (d,), (d,), "copy"),
        ("attn.qkv.weight", ("attn", "qkv", "kernel"), (3 * d, d), (d, 3, h, dh), "linear"),
        ("attn.qkv.bias", ("attn", "qkv", "bias"), (3 * d,), (3, h, dh), "copy"),
        ("attn.proj.weight", ("attn", "proj", "kernel"), (d, d), (h, dh, d), "linear"),
        ("attn.proj.bias", ("attn", "proj", "bias"), (d,), (d,), "copy"),
        ("norm2.weight", ("norm2", "scale"), (d,), (d,), "copy"),
        ("norm2.bias", ("norm2", "bias"), (d,), (d,), "copy"),
        ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), (f, d), (d, f), "linear"),
        ("mlp.fc1.bias", ("mlp", "fc1", "bias"), (f,), (f,), "copy"),
        ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), (d, f), (f, d), "linear"),
        ("mlp.fc2.bias", ("mlp", "fc2", "bias"), (d,), (d,), "copy"),
    ]
    if c.layer_scale:
        e += [
            ("ls1.scale_factor", ("ls1", "scale_factor"), (d,), (d,), "copy"),
            ("ls2.scale_factor", ("ls2", "scale_factor"), (d,), (d,), "copy"),
        ]
    return e


def vit_specs(c: ViTConfig, scanned: bool, prefix: str = "", path: tuple = ()) -> list[ParamSpec]:
    """Specs of one timm tower: HF keys `prefix + <timm key>`, Flax paths `path + <ViT param path>`."""
    d, p, f, h, dh = c.embed_dim, c.patch_size, c.mlp_dim, c.num_heads, c.head_dim
    spec = lambda key, sub, hf, fx, kind="copy", **kw: ParamSpec(prefix + key, path + sub, hf, fx, kind, **kw)  # noqa: E731
    specs = []
    if c.class_token:
        specs.append(spec("cls_token", ("cls_token",), (1, 1, d), (1, 1, d)))
    if c.reg_tokens:
        specs.append(spec("reg_token", ("reg_token",), (1, c.reg_tokens, d), (1, c.reg_tokens, d)))
    specs += [
        spec(
            "pos_embed",
            ("pos_embed",),
            (1, c.num_pos_prefix + c.num_patches, d),
            (1, c.num_pos_prefix + c.num_patches, d),
        ),
        spec("patch_embed.proj.weight", ("patch_embed", "kernel"), (d, 3, p, p), (p, p, 3, d), "conv"),
        spec("patch_embed.proj.bias", ("patch_embed", "bias"), (d,), (d,)),
    ]
    for i in range(c.depth):
        for name, sub, hf, fx, kind in _block_entries(c):
            if scanned:
                specs.append(spec(f"blocks.{i}.{name}", ("blocks",) + sub, hf, fx, kind, layer=i, num_layers=c.depth))
            else:
                specs.append(spec(f"blocks.{i}.{name}", (f"blocks_{i}",) + sub, hf, fx, kind))
    specs += [spec("norm.weight", ("norm", "scale"), (d,), (d,)), spec("norm.bias", ("norm", "bias"), (d,), (d,))]
    if c.attn_pool:
        ap = lambda key, sub, hf, fx, kind="copy": spec("attn_pool." + key, ("attn_pool",) + sub, hf, fx, kind)  # noqa: E731
        specs += [
            ap("latent", ("latent",), (1, 1, d), (1, 1, d)),
            ap("q.weight", ("q", "kernel"), (d, d), (d, h, dh), "linear"),
            ap("q.bias", ("q", "bias"), (d,), (h, dh)),
            ap("kv.weight", ("kv", "kernel"), (2 * d, d), (d, 2, h, dh), "linear"),
            ap("kv.bias", ("kv", "bias"), (2 * d,), (2, h, dh)),
            ap("proj.weight", ("proj", "kernel"), (d, d), (h, dh, d), "linear"),
            ap("proj.bias", ("proj", "bias"), (d,), (d,)),
            ap("norm.weight", ("norm", "scale"), (d,), (d,)),
            ap("norm.bias", ("norm", "bias"), (d,), (d,)),
            ap("mlp.fc1.weight", ("mlp", "fc1", "kernel"), (f, d), (d, f), "linear"),
            ap("mlp.fc1.bias", ("mlp", "fc1", "bias"), (f,), (f,)),
            ap("mlp.fc2.weight", ("mlp", "fc2", "kernel"), (d, f), (f, d), "linear"),
            ap("mlp.fc2.bias", ("mlp", "fc2", "bias"), (d,), (d,)),
        ]
    return specs


def projector_specs(
    arch: str, vision_dim: int, llm_dim: int, prefix: str = "projector.", path: tuple = ("projector",)
) -> list[ParamSpec]:
    specs = []
    for i, (fin, fout) in enumerate(projector_lib.layer_dims(arch, vision_dim, llm_dim)):
        name = f"fc{i + 1}"
        specs.append(ParamSpec(f"{prefix}{name}.weight", path + (name, "kernel"), (fout, fin), (fin, fout), "linear"))
        specs.append(ParamSpec(f"{prefix}{name}.bias", path + (name, "bias"), (fout,), (fout,)))
    return specs


def backbone_specs(
    featurizer: ViTConfig,
    fused: ViTConfig | None,
    scanned: bool,
    prefix: str = "vision_backbone.",
    path: tuple = ("vision_backbone",),
) -> list[ParamSpec]:
    specs = vit_specs(featurizer, scanned, prefix + "featurizer.", path + ("featurizer",))
    if fused is not None:
        specs += vit_specs(fused, scanned, prefix + "fused_featurizer.", path + ("fused_featurizer",))
    return specs


def vision_specs(
    model_config: VLAConfig,
    scanned: bool,
    backbone_path: tuple = ("vision_backbone",),
    projector_path: tuple = ("projector",),
) -> list[ParamSpec]:
    """Every HF tensor of the vision backbone and projector of a model config, with the
    Flax paths of a VLA module holding them as submodules `backbone_path` and `projector_path`."""
    config = as_config(model_config)
    backbone = backbone_from_config(config)
    specs = backbone_specs(backbone.featurizer_config, backbone.fused_config, scanned, path=backbone_path)
    d = config.llm.hidden_size
    return specs + projector_specs(config.projector.arch, backbone.embed_dim, d, path=projector_path)
