"""The model config, typed: frozen dataclasses that hold every model default in one place.

`VLAConfig` is what the library builds models from. `configs/model.py` (ml_collections, so the command
line can override fields) starts from these defaults; checkpoints store `VLAConfig.to_dict()` as
`model_config.json`; `convert/hf_config.py` maps OpenVLA's HF `config.json` to and from it. Any
function that takes a model config calls `as_config` once, so a ConfigDict, a plain dict or a
`VLAConfig` all work, and a field the dataclasses do not know is an error that names it (with the
closest known name), never a silently ignored key.

Layout (the `model_config.json` / `configs/model.py` layout): `llm` (LlamaConfig), `vision`
(VisionConfig: two TowerConfigs), `projector`, and at the top level the vocabulary numbers, the
action options (ActionOptions' fields), the camera preprocessing and the numerics (Numerics' fields).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, cast

import ml_collections

from openvla_jax.utils.files import read_json

DINOV2_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_ID = "vit_so400m_patch14_siglip_224"
HEADS = ("tokens", "l1")
DECODINGS = ("autoregressive", "parallel")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama 2 decoder; field names follow transformers' LlamaConfig, defaults are OpenVLA-7B's."""

    vocab_size: int = 32064  # Llama's 32000 padded to a multiple of 64
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: as many as attention heads (no GQA)
    rms_norm_eps: float = 1e-6  # what the released openvla-7b runs with (LlamaConfig default)
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d) -> "LlamaConfig":
        """From a ConfigDict or dict of these fields (absent or None: the default); unknown: an error."""
        return _build(cls, d, "model.llm")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """A timm ViT by model id, with optional width/depth/heads overrides (None keeps timm's)."""

    model_id: str = DINOV2_ID
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None

    @classmethod
    def from_dict(cls, d) -> "TowerConfig":
        return _build(cls, d, "tower")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The fused backbone: `featurizer` (DINOv2) and `fused_featurizer` (SigLIP; None: one tower)."""

    image_size: int = 224  # square input, pixels
    featurizer: TowerConfig = TowerConfig(DINOV2_ID)
    fused_featurizer: Optional[TowerConfig] = TowerConfig(SIGLIP_ID)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    arch: str = "fused-gelu-mlp"  # or "gelu-mlp" (single backbone); models/projector.py

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ActionOptions:
    """What a VLA predicts and from what: OpenVLA's defaults, the OpenVLA-OFT options otherwise."""

    action_dim: int = 7  # A
    action_chunk: int = 1  # K actions per prediction
    decoding: str = "autoregressive"  # or "parallel": the K x A positions in one forward pass
    action_head: str = "tokens"  # or "l1": continuous actions from the placeholders' hidden states
    proprio_dim: int = 0  # > 0: one projected proprio token after the patches
    num_images: int = 1  # cameras per row, through the same fused backbone

    def __post_init__(self):
        if self.decoding not in DECODINGS:
            raise ValueError(f"model.decoding={self.decoding!r}; expected one of {DECODINGS}")
        if self.action_head not in HEADS:
            raise ValueError(f"model.action_head={self.action_head!r}; expected one of {HEADS}")
        if self.action_head == "l1" and self.decoding != "parallel":
            raise ValueError("model.action_head='l1' (continuous actions) needs model.decoding='parallel'")
        for k in ("action_dim", "action_chunk", "num_images"):
            if getattr(self, k) < 1:
                raise ValueError(f"model.{k} must be >= 1, got {getattr(self, k)}")
        if self.proprio_dim < 0:
            raise ValueError(f"model.proprio_dim must be >= 0, got {self.proprio_dim}")

    @property
    def continuous(self) -> bool:
        return self.action_head == "l1"

    @property
    def parallel(self) -> bool:
        return self.decoding == "parallel"

    def differences_from_openvla(self) -> dict:
        """The options that differ from OpenVLA's ({} for OpenVLA itself); `action_dim` is not one."""
        base = dataclasses.replace(ActionOptions(), action_dim=self.action_dim)
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(base, f.name)
        }


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How the model computes, not what it is: the same params load under any of these."""

    param_dtype: str = "float32"  # fp32 master params
    dtype: str = "bfloat16"  # compute dtype
    scan_layers: bool = False  # decoder / ViT blocks as one nn.scan (params stacked on `layers`)
    remat_policy: str = "none"  # models/common.py REMAT_POLICIES
    attention_impl: str = "xla"  # "xla", "dpa" or "cudnn" (models/common.py attention)


@dataclasses.dataclass(frozen=True)
class VLAConfig:
    """The whole model. Defaults: OpenVLA-7B (Llama 2 7B + DINOv2 ViT-L/14-reg4 + SigLIP So400m/14)."""

    variant: str = "model"  # a name for logs and errors ("7b", "tiny", "hf" ...)
    llm: LlamaConfig = LlamaConfig()
    vision: VisionConfig = VisionConfig()
    projector: ProjectorConfig = ProjectorConfig()
    n_action_bins: int = 256
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64  # vocab_size less this is the base vocabulary (action ids end there)
    # ActionOptions (the OpenVLA-OFT options; defaults are OpenVLA's).
    action_dim: int = ActionOptions.action_dim
    action_chunk: int = ActionOptions.action_chunk
    decoding: str = ActionOptions.decoding
    action_head: str = ActionOptions.action_head
    proprio_dim: int = ActionOptions.proprio_dim
    num_images: int = ActionOptions.num_images
    # How OpenVLA.predict_action turns camera frames into pixels (models/preprocess.py): "processor"
    # is the HF processor's bicubic resize (the original's predict_action). Exports of our training
    # loop record "train" (the pipeline's lanczos3), or "train_jpeg", and center_crop 0.9 after
    # random-crop augmentation, so a trained model sees frames as its training data showed them.
    image_resize: str = "processor"
    center_crop: float = 0.0  # area fraction kept (0: no crop)
    # Numerics.
    param_dtype: str = Numerics.param_dtype
    dtype: str = Numerics.dtype
    scan_layers: bool = Numerics.scan_layers
    remat_policy: str = Numerics.remat_policy
    attention_impl: str = Numerics.attention_impl

    def __post_init__(self):
        self.actions  # noqa: B018  (checks the options)

    @property
    def actions(self) -> ActionOptions:
        return ActionOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ActionOptions)})

    @property
    def numerics(self) -> Numerics:
        return Numerics(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Numerics)})

    @classmethod
    def from_dict(cls, d) -> "VLAConfig":
        """From a ConfigDict or dict in this layout (absent fields: the defaults); unknown: an error."""
        return _build(cls, d, "model")

    def to_dict(self) -> dict:
        """The nested plain dict (`model_config.json`): `from_dict(c.to_dict()) == c`."""
        return dataclasses.asdict(self)

    def to_config_dict(self) -> ml_collections.ConfigDict:
        """A mutable ConfigDict in the same layout (tower fields accept ints where they hold None)."""
        d = self.to_dict()
        cd = ml_collections.ConfigDict(d)
        vision = cast(ml_collections.ConfigDict, cd.vision)
        for key in ("featurizer", "fused_featurizer"):
            if d["vision"][key] is not None:
                vision[key] = ml_collections.ConfigDict(d["vision"][key], type_safe=False)
        return cd

    def replace(self, **changes) -> "VLAConfig":
        """A copy with top-level `changes` (names checked; nested sections as dicts or dataclasses)."""
        return _build(
            VLAConfig, {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes}, "model"
        )


def as_config(model_config) -> VLAConfig:
    """A `VLAConfig` from a VLAConfig (returned as is), a ConfigDict or a dict; unknown fields raise."""
    if isinstance(model_config, VLAConfig):
        return model_config
    return VLAConfig.from_dict(model_config)


def write_model_config(path, model_config) -> None:
    """`model_config.json` as checkpoints hold it: `VLAConfig.to_dict()`, sorted keys."""
    Path(path).write_text(json.dumps(as_config(model_config).to_dict(), indent=2, sort_keys=True) + "\n")


def read_model_config(path) -> VLAConfig:
    """A checkpoint's `model_config.json` -> `VLAConfig`; an unknown field is an error naming the file."""
    try:
        return VLAConfig.from_dict(read_json(path, "model config"))
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from e


def as_tower(tower) -> TowerConfig:
    """A `TowerConfig` from a TowerConfig, a ConfigDict or a dict."""
    return tower if isinstance(tower, TowerConfig) else TowerConfig.from_dict(tower)


def unknown_fields_error(where: str, unknown, known) -> ValueError:
    """ "unknown field(s) model.llm.num_hiden_layers (did you mean 'num_hidden_layers'?)"."""
    parts = []
    for k in sorted(unknown):
        close = difflib.get_close_matches(k, list(known), n=1)
        parts.append(f"{where}.{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"unknown model config field(s): {', '.join(parts)}; {where} has {sorted(known)}")


def _plain(d) -> Any:
    return d.to_dict() if isinstance(d, ml_collections.ConfigDict) else d


def _build(cls, d, where: str):
    """`cls(**d)` with nested dataclasses built from their dicts, numbers coerced to the field's type
    (JSON and ConfigDicts may hold 1 for 1.0), None on a non-Optional field taking the default."""
    d = _plain(d)
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(d) - set(names)
    if unknown:
        raise unknown_fields_error(where, unknown, names)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) is typing.Union and type(None) in args
        if v is None:
            if optional:
                kwargs[k] = None
            continue
        kwargs[k] = _coerce(args[0] if optional else tp, v, f"{where}.{k}")
    return cls(**kwargs)


def _coerce(tp, v, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if tp is bool:
        if not isinstance(v, (bool, int)):
            raise TypeError(f"{where}: expected a bool, got {v!r}")
        return bool(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise TypeError(f"{where}: expected an int, got {v!r}")
        return int(v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{where}: expected a number, got {v!r}")
        return float(v)
    return v
