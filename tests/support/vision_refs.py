"""PyTorch references for the vision tests: tiny random timm towers and Prismatic's fused backbone."""

import numpy as np

from configs import model as model_configs
from openvla_jax.convert.mapping import hf_to_flax
from openvla_jax.convert.vision import vit_specs
from openvla_jax.models import vit
from openvla_jax.testing import torch_reference
from tests.support.helpers import torch

TINY = model_configs.get_config("tiny")
DINO, SIGLIP = TINY.vision.featurizer, TINY.vision.fused_featurizer
# DINOv2 without registers: its pos_embed also covers the cls token (timm no_embed_class=False).
DINO_NOREG = model_configs.tower_config("vit_large_patch14_dinov2.lvd142m", (64, 3, 4))


def timm_tower(tower, seed: int, img_size: int = 224, **kw):
    """timm model `tower.model_id` at the tower's reduced size, every tensor random."""
    torch()  # registers the torchvision op schemas before timm imports torchvision
    return torch_reference.timm_tower(tower, seed, img_size, **kw)


def hf_state(model, prefix: str = "") -> dict:
    """timm state dict as numpy with HF names (`gamma` -> `scale_factor`)."""
    return {
        prefix + k.replace(".gamma", ".scale_factor"): v.detach().numpy().copy() for k, v in model.state_dict().items()
    }


def tower_config(tower, img_size: int = 224) -> vit.ViTConfig:
    return vit.tower_from_config(tower, img_size)


def flax_params(model, tower, scanned: bool, img_size: int = 224) -> dict:
    return hf_to_flax(vit_specs(tower_config(tower, img_size), scanned), hf_state(model))


def second_to_last(model, x_nchw):
    """Prismatic's featurizer forward (second-to-last block), without gradients."""
    t = torch()
    with t.no_grad():
        return torch_reference.second_to_last(model, x_nchw)


def images(b: int, size: int = 224, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random NHWC float32 pixel values of normalised-image scale."""
    return np.random.default_rng(seed).standard_normal((b, size, size, channels)).astype(np.float32)
