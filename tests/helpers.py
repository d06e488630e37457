"""Shared test utilities: PyTorch references and comparisons."""

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def torch():
    """Import torch, registering the two torchvision op schemas timm's import needs.

    The registry's torchvision wheel is a CUDA build whose C++ ops fail to load against CPU torch;
    defining `torchvision::nms` / `qnms` schemas first lets `import torchvision` (and so timm) work.
    """
    import torch as _torch

    _torch.set_num_threads(2)
    try:
        lib = _torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        torch._torchvision_lib = lib  # keep the registration alive
    except RuntimeError:  # already defined (real torchvision ops loaded)
        pass
    return _torch


def timm():
    torch()
    import timm as _timm

    return _timm


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
