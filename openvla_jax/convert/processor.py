"""The processor files of an OpenVLA HF directory, from a model config: what the original's
`AutoProcessor.from_pretrained(dir, trust_remote_code=True)` reads.

The released openvla-7b holds two of them beside `config.json`, both reaching the remote code
`processing_prismatic.py` through "auto_map":
  preprocessor_config.json  `PrismaticImageProcessor`: per tower `input_sizes` `[3, S, S]`,
                            `interpolations`, `means`, `stds`, plus `image_resize_strategy` and
                            `use_fused_vision_backbone`; and the torchvision functional arguments its
                            constructor derives from them (`tvf_resize_params`, `tvf_crop_params`,
                            `tvf_normalize_params`, `tvf_do_letterbox`, `tvf_letterbox_fill`), which
                            `save_pretrained` writes and which a load sets as written (they win)
  processor_config.json     `PrismaticProcessor` (image processor + tokenizer)
Per-tower values are what timm's pretrained data config says for the tower's model id (the
original's converter read them with `timm.data.resolve_model_data_config`): bicubic, ImageNet
statistics for DINOv2, 0.5 for SigLIP; the channels are stacked in tower order (DINOv2 0-2, SigLIP
3-5), as `models/preprocess.py` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from openvla_jax.models.config import as_config
from openvla_jax.models.preprocess import DINOV2_MEAN, DINOV2_STD, SIGLIP_MEAN, SIGLIP_STD

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
PROCESSOR_FILES = (PREPROCESSOR_CONFIG, PROCESSOR_CONFIG)
REMOTE_MODULE = "processing_prismatic"
AUTO_MAP = {
    "AutoImageProcessor": f"{REMOTE_MODULE}.PrismaticImageProcessor",
    "AutoProcessor": f"{REMOTE_MODULE}.PrismaticProcessor",
}
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")
# timm's pretrained data config per tower family (`timm.models.get_pretrained_cfg(model_id)`: the
# same for every id of a family that `models/vit.py` knows).
TOWER_DATA = {
    "dinov2": dict(interpolation="bicubic", mean=DINOV2_MEAN, std=DINOV2_STD),
    "siglip": dict(interpolation="bicubic", mean=SIGLIP_MEAN, std=SIGLIP_STD),
}
# torchvision's `pil_modes_mapping`: the PIL resample code `tvf_resize_params` holds.
PIL_MODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def tower_data(model_id: str) -> dict:
    """`{"interpolation", "mean", "std"}` of a timm tower id (pretrained tag ignored)."""
    arch = model_id.split(".")[0]
    family = [f for f in TOWER_DATA if f in arch]
    if len(family) != 1:
        raise ValueError(
            f"no image preprocessing known for tower {model_id!r}; expected a {' or '.join(TOWER_DATA)} model id"
        )
    return TOWER_DATA[family[0]]


def _f32(values) -> list[float]:
    """As the original's constructor writes them: the float32 tensor's values as Python floats."""
    return [float(v) for v in np.asarray(values, np.float32)]


def image_processor_config(model_config, image_resize_strategy: str = "resize-naive") -> dict:
    """`preprocessor_config.json` for a `VLAConfig` (or a ConfigDict / dict in its layout): one entry
    per tower at `vision.image_size`; `image_resize_strategy` as the source config.json says."""
    if image_resize_strategy not in RESIZE_STRATEGIES:
        raise ValueError(f"image_resize_strategy {image_resize_strategy!r}: expected one of {RESIZE_STRATEGIES}")
    vc = as_config(model_config).vision
    towers = [vc.featurizer] + ([vc.fused_featurizer] if vc.fused_featurizer is not None else [])
    s = int(vc.image_size)
    data = [tower_data(t.model_id) for t in towers]
    # timm's eval transform at crop_pct 1: Resize(S) (shorter side), CenterCrop(S); "resize-naive"
    # resizes to (S, S) instead, without keeping the aspect ratio.
    size: Any = [s, s] if image_resize_strategy == "resize-naive" else s
    letterbox = image_resize_strategy == "letterbox"
    return dict(
        sorted(
            dict(
                auto_map=dict(AUTO_MAP),
                image_processor_type="PrismaticImageProcessor",
                processor_class="PrismaticProcessor",
                image_resize_strategy=image_resize_strategy,
                use_fused_vision_backbone=len(towers) == 2,
                input_sizes=[[3, s, s] for _ in towers],
                interpolations=[d["interpolation"] for d in data],
                means=[list(d["mean"]) for d in data],
                stds=[list(d["std"]) for d in data],
                tvf_resize_params=[
                    {"antialias": True, "interpolation": PIL_MODES[d["interpolation"]], "max_size": None, "size": size}
                    for d in data
                ],
                tvf_crop_params=[{"output_size": [s, s]} for _ in data],
                tvf_normalize_params=[{"inplace": False, "mean": _f32(d["mean"]), "std": _f32(d["std"])} for d in data],
                tvf_do_letterbox=letterbox,
                # The original fills with the last tower's mean in 0..255 (one fill for all towers).
                tvf_letterbox_fill=[int(x * 255) for x in data[-1]["mean"]] if letterbox else None,
            ).items()
        )
    )


def processor_config() -> dict:
    """`processor_config.json`: the processor class, reached through "auto_map"."""
    return {"auto_map": {"AutoProcessor": AUTO_MAP["AutoProcessor"]}, "processor_class": "PrismaticProcessor"}
