"""Importing the PyTorch references (tests and benchmarks only; the library never needs torch).

The registry's torchvision wheel is a CUDA build whose C++ ops fail to load against the CPU torch
wheel, and transformers/timm import torchvision. Defining the two op schemas torchvision registers
at import (`torchvision::nms`, `torchvision::qnms`) first lets the import succeed.
"""

import functools

_TORCHVISION_LIBRARY = None  # the registration lives as long as this object


@functools.lru_cache(maxsize=None)
def import_torch(num_threads: int | None = None):
    global _TORCHVISION_LIBRARY
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIBRARY = lib
    except RuntimeError:  # already defined: the real torchvision ops loaded
        pass
    return torch


def transformers_llama(config, attn_implementation: str = "eager"):
    """A random `transformers.LlamaForCausalLM` (eval mode) with the shapes of an
    `openvla_jax.models.llama.LlamaConfig`, whose field names are transformers' own."""
    import dataclasses

    import_torch()
    import transformers

    hf_config = transformers.LlamaConfig(
        **dataclasses.asdict(config),
        attn_implementation=attn_implementation,  # pyright: ignore[reportCallIssue]  (a PretrainedConfig kwarg)
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(hf_config).eval()
