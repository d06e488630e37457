"""OpenVLA `config.json` <-> our model config (`configs/model.py` layout), and `generation_config.json`.

The original `OpenVLAConfig` (remote code `configuration_prismatic.py`) stores the vision towers as
`timm_model_ids` (one per backbone; two when `use_fused_vision_backbone`), the LLM as a `text_config`
that holds only what differs from transformers' `LlamaConfig` defaults (openvla-7b sets just
`vocab_size` 32064, `pad_token_id` and `torch_dtype`), and the projector in `arch_specifier`
(`"no-align+fused-gelu-mlp"`). We add one optional field the original ignores, `timm_overrides`
(`{model_id: {"embed_dim", "depth", "num_heads"}}`), so tiny test checkpoints use the same path.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections

from openvla_jax.models import projector as projector_lib

# transformers' LlamaConfig defaults: what a `text_config` that omits a field means.
LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    initializer_range=0.02,
)
# Fields of the original config.json that describe the released openvla-7b and that our model
# config does not carry (written back unchanged on export unless the caller overrides them).
OPENVLA_7B_FIELDS = dict(
    vision_backbone_id="dinosiglip-vit-so-224px",
    llm_backbone_id="llama2-7b-pure",
    hf_llm_id="meta-llama/Llama-2-7b-hf",
    image_resize_strategy="resize-naive",
    llm_max_length=2048,
    pad_to_multiple_of=64,
    output_projector_states=False,
    transformers_version="4.40.1",
)
AUTO_MAP = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
}
# configs/model.py's numerics defaults (fp32 master params, bf16 compute).
NUMERICS = dict(param_dtype="float32", dtype="bfloat16", scan_layers=False, remat_policy="none", attention_impl="xla")
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000}
TOWER_FIELDS = ("embed_dim", "depth", "num_heads")


def projector_arch(arch_specifier: str) -> str:
    """`"no-align+fused-gelu-mlp"` -> `"fused-gelu-mlp"`; `"gelu-mlp"` -> `"gelu-mlp"`."""
    arch = arch_specifier.split("+")[-1]
    if arch not in projector_lib.ARCHS:
        raise ValueError(
            f"config.json arch_specifier {arch_specifier!r}: projector {arch!r} is not one of {projector_lib.ARCHS}"
        )
    return arch


def _tower(model_id: str, overrides: dict) -> ml_collections.ConfigDict:
    o = overrides.get(model_id, {}) or {}
    bad = sorted(set(o) - set(TOWER_FIELDS))
    if bad:
        raise ValueError(f"config.json timm_overrides[{model_id!r}] has unknown fields {bad}; expected {TOWER_FIELDS}")
    # The layout of configs/model.py's tower_config (the library does not import configs/).
    return ml_collections.ConfigDict(dict(model_id=model_id, **{k: o.get(k) for k in TOWER_FIELDS}), type_safe=False)


def model_config_from_hf(config_json: dict) -> ml_collections.ConfigDict:
    """An OpenVLA `config.json` (dict) -> model ConfigDict in the layout of `configs/model.py`.

    Numerics (`dtype`, `param_dtype`, `scan_layers`, ...) take `configs/model.py`'s defaults.
    Absent `text_config` fields take transformers' LlamaConfig defaults (kv heads = heads)."""
    c = dict(config_json)
    for field in ("timm_model_ids",):
        if field not in c:
            raise ValueError(f"config.json has no {field!r}; is this an OpenVLA checkpoint?")
    ids = list(c["timm_model_ids"])
    fused = bool(c.get("use_fused_vision_backbone", len(ids) > 1))
    if len(ids) != (2 if fused else 1):
        raise ValueError(
            f"config.json: use_fused_vision_backbone={fused} needs {2 if fused else 1} timm_model_ids, got {ids}"
        )
    sizes = list(c.get("image_sizes") or [224] * len(ids))
    if len(set(sizes)) != 1:
        raise ValueError(f"config.json image_sizes {sizes}: towers at different resolutions are not supported")
    overrides = c.get("timm_overrides") or {}
    unknown = sorted(set(overrides) - set(ids))
    if unknown:
        raise ValueError(f"config.json timm_overrides names {unknown}, which are not in timm_model_ids {ids}")
    acts = [a for a in (c.get("timm_override_act_layers") or []) if a is not None]
    if acts:
        raise ValueError(
            f"config.json timm_override_act_layers {acts}: only the default (erf GELU) towers are supported"
        )

    text = dict(c.get("text_config") or {})
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json text_config.model_type {text['model_type']!r}: only llama is supported")
    llm = {k: text.get(k, v) for k, v in LLAMA_DEFAULTS.items()}
    if llm["num_key_value_heads"] is None:
        llm["num_key_value_heads"] = llm["num_attention_heads"]

    config = ml_collections.ConfigDict()
    config.variant = "hf"
    config.llm = ml_collections.ConfigDict(
        {k: (float(v) if isinstance(LLAMA_DEFAULTS[k], float) else int(v)) for k, v in llm.items()}
    )
    config.vision = ml_collections.ConfigDict(
        dict(
            image_size=int(sizes[0]),
            featurizer=_tower(ids[0], overrides),
            fused_featurizer=_tower(ids[1], overrides) if fused else None,
        ),
        type_safe=False,
    )
    config.projector = ml_collections.ConfigDict(
        dict(arch=projector_arch(c.get("arch_specifier", "no-align+fused-gelu-mlp")))
    )
    config.n_action_bins = int(c.get("n_action_bins", 256))
    config.pad_token_id = int(c.get("pad_token_id", 32000))
    config.image_resize, config.center_crop = "processor", 0.0  # the HF processor (OpenVLA.predict_action)
    config.update(NUMERICS)
    return config


def text_config_from_model_config(model_config, torch_dtype: str) -> dict:
    """`text_config` as the original writes it: model_type, pad id, dtype, and the Llama fields that
    differ from transformers' defaults (openvla-7b: only vocab_size)."""
    llm = model_config.llm
    out: dict[str, Any] = {
        "model_type": "llama",
        "pad_token_id": int(model_config.get("pad_token_id", 32000)),
        "torch_dtype": torch_dtype,
    }
    for k, default in LLAMA_DEFAULTS.items():
        value = llm.get(k)
        if k == "num_key_value_heads":
            default = llm.num_attention_heads
        if value is not None and value != default:
            out[k] = value
    out["vocab_size"] = int(llm.vocab_size)
    return dict(sorted(out.items()))


def hf_config_from_model_config(
    model_config, norm_stats: Optional[dict] = None, torch_dtype: str = "bfloat16", extra: Optional[dict] = None
) -> dict:
    """The `config.json` the original PyTorch code loads (`AutoModelForVision2Seq`, trust_remote_code).

    `extra` overrides or adds fields (e.g. the source checkpoint's `vision_backbone_id`)."""
    vc = model_config.vision
    towers = [vc.featurizer] + ([vc.fused_featurizer] if vc.get("fused_featurizer") is not None else [])
    fused = len(towers) == 2
    arch = model_config.projector.get("arch", "fused-gelu-mlp")
    out: dict[str, Any] = dict(OPENVLA_7B_FIELDS)
    out.update(
        model_type="openvla",
        architectures=["OpenVLAForActionPrediction"],
        auto_map=dict(AUTO_MAP),
        arch_specifier=f"no-align+{arch}",
        use_fused_vision_backbone=fused,
        image_sizes=[int(vc.get("image_size", 224))] * len(towers),
        timm_model_ids=[t.model_id for t in towers],
        timm_override_act_layers=[None] * len(towers),
        pad_token_id=int(model_config.get("pad_token_id", 32000)),
        n_action_bins=int(model_config.get("n_action_bins", 256)),
        norm_stats=norm_stats,
        torch_dtype=torch_dtype,
        text_config=text_config_from_model_config(model_config, torch_dtype),
    )
    overrides = {t.model_id: {k: t.get(k) for k in TOWER_FIELDS if t.get(k) is not None} for t in towers}
    overrides = {k: v for k, v in overrides.items() if v}
    if overrides:
        out["timm_overrides"] = overrides
    out.update(extra or {})
    return dict(sorted(out.items()))


def generation_config() -> dict:
    return dict(GENERATION_CONFIG, transformers_version=OPENVLA_7B_FIELDS["transformers_version"])
