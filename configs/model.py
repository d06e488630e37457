"""Model configs: `--config=configs/model.py:<variant>` with variant in {7b, small, tiny}.

One code path for every size: the variants differ only in the numbers below. `7b` is OpenVLA's exact
shape (Llama 2 7B + DINOv2 ViT-L/14-reg4 + SigLIP So400m/14, vocabulary padded to 32064).
"""

import ml_collections

DINOV2_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_ID = "vit_so400m_patch14_siglip_224"

# (llama hidden, layers, heads, mlp) and (dino width, depth, heads), (siglip width, depth, heads).
_SIZES = {
    "7b": dict(llm=(4096, 32, 32, 11008), dino=None, siglip=None),
    "small": dict(llm=(512, 8, 8, 1376), dino=(384, 6, 6), siglip=(384, 6, 6)),
    "tiny": dict(llm=(64, 2, 4, 128), dino=(64, 3, 4), siglip=(48, 3, 4)),
}


def llm_config(hidden: int, layers: int, heads: int, mlp: int) -> ml_collections.ConfigDict:
    """Llama 2 decoder; field names follow transformers' LlamaConfig."""
    return ml_collections.ConfigDict(
        dict(
            vocab_size=32064,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            rms_norm_eps=1e-6,  # what the released openvla-7b runs with (LlamaConfig default)
            rope_theta=10000.0,
            max_position_embeddings=2048,
            initializer_range=0.02,
        )
    )


def tower_config(model_id: str, size) -> ml_collections.ConfigDict:
    """A timm ViT by model id, with optional width/depth/heads overrides (None keeps timm's)."""
    embed_dim, depth, num_heads = size if size is not None else (None, None, None)
    return ml_collections.ConfigDict(
        dict(model_id=model_id, embed_dim=embed_dim, depth=depth, num_heads=num_heads),
        type_safe=False,
    )


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in _SIZES:
        raise ValueError(f"unknown model variant {variant!r}; expected one of {sorted(_SIZES)}")
    size = _SIZES[variant]
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.llm = llm_config(*size["llm"])
    config.vision = ml_collections.ConfigDict(
        dict(
            image_size=224,
            featurizer=tower_config(DINOV2_ID, size["dino"]),
            fused_featurizer=tower_config(SIGLIP_ID, size["siglip"]),
        )
    )
    config.projector = ml_collections.ConfigDict(dict(arch="fused-gelu-mlp"))
    config.n_action_bins = 256
    config.pad_token_id = 32000
    # Actions. The defaults are OpenVLA; the rest are the OFT options (openvla_jax/models/vla.py).
    config.action_dim = 7
    config.action_chunk = 1  # K actions per prediction
    config.decoding = "autoregressive"  # or "parallel": the K x A positions in one forward pass
    config.action_head = "tokens"  # or "l1": continuous actions from an MLP (needs "parallel")
    config.proprio_dim = 0  # > 0: one projected proprio token after the patches
    config.num_images = 1  # cameras per row, through the same fused backbone
    # How OpenVLA.predict_action turns camera frames into pixels (models/preprocess.py): "processor"
    # is the HF processor's bicubic resize (the original's predict_action). Exports of our training
    # loop record "train" (the pipeline's lanczos3), or "train_jpeg", and center_crop 0.9 after
    # random-crop augmentation, so a trained model sees frames as its training data showed them.
    config.image_resize = "processor"
    config.center_crop = 0.0
    # Numerics and memory: fp32 master params, bf16 compute for training by default.
    config.param_dtype = "float32"
    config.dtype = "bfloat16"
    config.scan_layers = False
    config.remat_policy = "none"
    config.attention_impl = "xla"
    return config
