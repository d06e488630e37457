"""Model configs: `--config=configs/model.py:<variant>` with variant in {7b, small, tiny}.

One code path for every size: the variants differ only in the numbers below; every other field (and
every default) comes from the typed config, `openvla_jax.models.config.VLAConfig`. `7b` is OpenVLA's
exact shape (Llama 2 7B + DINOv2 ViT-L/14-reg4 + SigLIP So400m/14, vocabulary padded to 32064).
The ConfigDict returned is that dataclass's `to_config_dict()`, so `--config.model.<field>` overrides
work; the library turns it back into a `VLAConfig` (an unknown field is an error naming it).
"""

import ml_collections

from openvla_jax.models.config import (
    DINOV2_ID,
    SIGLIP_ID,
    LlamaConfig,
    TowerConfig,
    VisionConfig,
    VLAConfig,
)

# (llama hidden, layers, heads, mlp) and (dino width, depth, heads), (siglip width, depth, heads).
_SIZES = {
    "7b": dict(llm=(4096, 32, 32, 11008), dino=None, siglip=None),
    "small": dict(llm=(512, 8, 8, 1376), dino=(384, 6, 6), siglip=(384, 6, 6)),
    "tiny": dict(llm=(64, 2, 4, 128), dino=(64, 3, 4), siglip=(48, 3, 4)),
}


def llm_config(hidden: int, layers: int, heads: int, mlp: int) -> ml_collections.ConfigDict:
    """Llama 2 decoder; field names follow transformers' LlamaConfig."""
    return ml_collections.ConfigDict(_llm(hidden, layers, heads, mlp).to_dict())


def _llm(hidden: int, layers: int, heads: int, mlp: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)


def _tower(model_id: str, size) -> TowerConfig:
    embed_dim, depth, num_heads = size if size is not None else (None, None, None)
    return TowerConfig(model_id=model_id, embed_dim=embed_dim, depth=depth, num_heads=num_heads)


def tower_config(model_id: str, size) -> ml_collections.ConfigDict:
    """A timm ViT by model id, with optional width/depth/heads overrides (None keeps timm's)."""
    return ml_collections.ConfigDict(_tower(model_id, size).to_dict(), type_safe=False)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in _SIZES:
        raise ValueError(f"unknown model variant {variant!r}; expected one of {sorted(_SIZES)}")
    size = _SIZES[variant]
    config = VLAConfig(
        variant=variant,
        llm=_llm(*size["llm"]),
        vision=VisionConfig(
            featurizer=_tower(DINOV2_ID, size["dino"]), fused_featurizer=_tower(SIGLIP_ID, size["siglip"])
        ),
    )
    return config.to_config_dict()
