"""Image normalisation for the fused DINOv2 + SigLIP backbone.

Layout inside openvla_jax is NHWC: `pixel_values [B, 224, 224, 6]` float32, channels 0-2 normalised
for DINOv2 and 3-5 for SigLIP (the HF processor's NCHW `[B, 6, 224, 224]` is accepted at the API
boundary and transposed).
"""

import numpy as np

DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Per output channel, so one affine map turns [0, 1] RGB (repeated twice) into the 6 channels.
FUSED_MEAN = np.array(DINOV2_MEAN + SIGLIP_MEAN, np.float32)
FUSED_STD = np.array(DINOV2_STD + SIGLIP_STD, np.float32)


def normalize_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, 3]` -> float32 `[..., H, W, 6]` (DINOv2 channels, then SigLIP channels)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [..., H, W, 3], got {images.dtype} {images.shape}")
    x = images.astype(np.float32) / 255.0
    return (np.concatenate([x, x], axis=-1) - FUSED_MEAN) / FUSED_STD
