"""OpenVLA `config.json` <-> our typed model config (`models/config.py` VLAConfig), and `generation_config.json`.

The original `OpenVLAConfig` (remote code `configuration_prismatic.py`) stores the vision towers as
`timm_model_ids` (one per backbone; two when `use_fused_vision_backbone`), the LLM as a `text_config`
that holds only what differs from transformers' `LlamaConfig` defaults (openvla-7b sets just
`vocab_size` 32064, `pad_token_id` and `torch_dtype`), and the projector in `arch_specifier`
(`"no-align+fused-gelu-mlp"`). We add one optional field the original ignores, `timm_overrides`
(`{model_id: {"embed_dim", "depth", "num_heads"}}`), so tiny test checkpoints use the same path.
A field close to a known one (`n_action_binz`) is an error that names it; other unknown fields pass,
as transformers lets a config.json carry any attribute.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

from openvla_jax.models import projector as projector_lib
from openvla_jax.models.config import LlamaConfig, ProjectorConfig, TowerConfig, VisionConfig, VLAConfig, as_config

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
    output_projector_states=False,
    transformers_version="4.40.1",
)
AUTO_MAP = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000}
TOWER_FIELDS = ("embed_dim", "depth", "num_heads")
# Fields a config.json may hold besides the ones read below: written by us or by the original
# (OPENVLA_7B_FIELDS, ...), or by transformers' PretrainedConfig.
KNOWN_FIELDS = frozenset(
    [*OPENVLA_7B_FIELDS, "model_type", "architectures", "auto_map", "norm_stats", "torch_dtype", "text_config"]
    + ["arch_specifier", "use_fused_vision_backbone", "image_sizes", "timm_model_ids", "timm_override_act_layers"]
    + [
        "timm_overrides",
        "n_action_bins",
        "pad_token_id",
        "pad_to_multiple_of",
        "bos_token_id",
        "eos_token_id",
        "_name_or_path",
    ]
)
TEXT_FIELDS = frozenset(
    [*LLAMA_DEFAULTS, "model_type", "pad_token_id", "bos_token_id", "eos_token_id", "torch_dtype", "hidden_act"]
    + ["rope_scaling", "attention_bias", "attention_dropout", "mlp_bias", "head_dim", "pretraining_tp"]
    + ["tie_word_embeddings", "use_cache", "architectures", "_name_or_path", "transformers_version"]
)


def projector_arch(arch_specifier: str) -> str:
    """`"no-align+fused-gelu-mlp"` -> `"fused-gelu-mlp"`; `"gelu-mlp"` -> `"gelu-mlp"`."""
    arch = arch_specifier.split("+")[-1]
    if arch not in projector_lib.ARCHS:
        raise ValueError(
            f"config.json arch_specifier {arch_specifier!r}: projector {arch!r} is not one of {projector_lib.ARCHS}"
        )
    return arch


def check_misspelled(fields: dict, known, where: str) -> None:
    """A field that is not one we know but is close to one (`n_action_binz`) is an error naming it.
    Other unknown fields pass: HF configs carry whatever PretrainedConfig attributes they were saved with."""
    for k in sorted(set(fields) - set(known)):
        close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ValueError(f"{where} has an unknown field {k!r}: did you mean {close[0]!r}?")


def _tower(model_id: str, overrides: dict) -> TowerConfig:
    o = overrides.get(model_id) or {}
    bad = sorted(set(o) - set(TOWER_FIELDS))
    if bad:
        raise ValueError(f"config.json timm_overrides[{model_id!r}] has unknown fields {bad}; expected {TOWER_FIELDS}")
    return TowerConfig.from_dict(dict(o, model_id=model_id))


def _llm(text: dict) -> LlamaConfig:
    """`text_config` -> LlamaConfig; absent fields take transformers' defaults (kv heads = heads)."""
    check_misspelled(text, TEXT_FIELDS, "config.json text_config")
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json text_config.model_type {text['model_type']!r}: only llama is supported")
    return LlamaConfig.from_dict({k: text.get(k, v) for k, v in LLAMA_DEFAULTS.items()})


def model_config_from_hf(config_json: dict) -> VLAConfig:
    """An OpenVLA `config.json` (dict) -> `VLAConfig`.

    What config.json does not hold (numerics, OFT options, camera preprocessing) takes the
    `VLAConfig` defaults; `image_resize` "processor" is the HF processor (OpenVLA.predict_action).
    Absent `text_config` fields take transformers' LlamaConfig defaults (kv heads = heads)."""
    c = dict(config_json)
    check_misspelled(c, KNOWN_FIELDS, "config.json")
    if "timm_model_ids" not in c:
        raise ValueError("config.json has no 'timm_model_ids'; is this an OpenVLA checkpoint?")
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
    return VLAConfig(
        variant="hf",
        llm=_llm(dict(c.get("text_config") or {})),
        vision=VisionConfig(
            image_size=int(sizes[0]),
            featurizer=_tower(ids[0], overrides),
            fused_featurizer=_tower(ids[1], overrides) if fused else None,
        ),
        projector=ProjectorConfig(arch=projector_arch(c.get("arch_specifier", "no-align+fused-gelu-mlp"))),
        n_action_bins=int(c.get("n_action_bins", 256)),
        pad_token_id=int(c.get("pad_token_id", 32000)),
        pad_to_multiple_of=int(c.get("pad_to_multiple_of", 64)),
    )


def text_config_from_model_config(model_config, torch_dtype: str) -> dict:
    """`text_config` as the original writes it: model_type, pad id, dtype, and the Llama fields that
    differ from transformers' defaults (openvla-7b: only vocab_size)."""
    config = as_config(model_config)
    llm = config.llm
    out: dict[str, Any] = {"model_type": "llama", "pad_token_id": config.pad_token_id, "torch_dtype": torch_dtype}
    for k, default in LLAMA_DEFAULTS.items():
        value = getattr(llm, k)
        if k == "num_key_value_heads":
            default = llm.num_attention_heads
        if value != default:
            out[k] = value
    out["vocab_size"] = llm.vocab_size
    return dict(sorted(out.items()))


def hf_config_from_model_config(
    model_config, norm_stats: Optional[dict] = None, torch_dtype: str = "bfloat16", extra: Optional[dict] = None
) -> dict:
    """The `config.json` the original PyTorch code loads (`AutoModelForVision2Seq`, trust_remote_code),
    from a `VLAConfig` (or a ConfigDict / dict in its layout).

    `extra` overrides or adds fields (e.g. the source checkpoint's `vision_backbone_id`)."""
    config = as_config(model_config)
    vc = config.vision
    towers = [vc.featurizer] + ([vc.fused_featurizer] if vc.fused_featurizer is not None else [])
    out: dict[str, Any] = dict(OPENVLA_7B_FIELDS)
    out.update(
        model_type="openvla",
        architectures=["OpenVLAForActionPrediction"],
        auto_map=dict(AUTO_MAP),
        arch_specifier=f"no-align+{config.projector.arch}",
        use_fused_vision_backbone=len(towers) == 2,
        image_sizes=[vc.image_size] * len(towers),
        timm_model_ids=[t.model_id for t in towers],
        timm_override_act_layers=[None] * len(towers),
        pad_token_id=config.pad_token_id,
        pad_to_multiple_of=config.pad_to_multiple_of,
        n_action_bins=config.n_action_bins,
        norm_stats=norm_stats,
        torch_dtype=torch_dtype,
        text_config=text_config_from_model_config(config, torch_dtype),
    )
    overrides = {t.model_id: {k: getattr(t, k) for k in TOWER_FIELDS if getattr(t, k) is not None} for t in towers}
    overrides = {k: v for k, v in overrides.items() if v}
    if overrides:
        out["timm_overrides"] = overrides
    out.update(extra or {})
    return dict(sorted(out.items()))


def generation_config() -> dict:
    return dict(GENERATION_CONFIG, transformers_version=OPENVLA_7B_FIELDS["transformers_version"])
