"""Which axes of a linear kernel are inputs and which are outputs: the one answer that conversion,
LoRA and quantization share.

A Flax kernel is `[*stack, *inputs, *outputs]`:
  stack    the nn.scan layer axis of a scanned model (`language_model/layers/...` in models/llama.py,
           `.../blocks/...` in models/vit.py); absent when unscanned.
  inputs   the contracted axes: all but the last for an output projection (`o_proj` `[H, hd, D]`,
           ViT `proj`), which contracts `(heads, head_dim)`; the first one otherwise
           (`q_proj` `[D, H, hd]`, ViT `qkv` `[D, 3, H, hd]`, Dense `[D_in, D_out]`).
  outputs  the rest.
Viewed as a matrix it is `[*stack, K, N]`, K = prod(inputs), N = prod(outputs): the PyTorch
`nn.Linear` weight is its transpose `[N, K]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

STACK_NAMES = ("layers", "blocks")  # the nn.scan stacks of models/llama.py and models/vit.py
OUTPUT_PROJECTIONS = ("o_proj", "proj")  # contract every axis but the last


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    stack: int  # leading scan axes: 0 or 1
    n_in: int  # contracted input axes
    n_out: int  # output axes

    def split(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """shape -> (stack dims, input dims, output dims)."""
        shape = tuple(shape)
        s, i = self.stack, self.stack + self.n_in
        return shape[:s], shape[s:i], shape[i:]

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """shape -> `[*stack, K, N]`."""
        lead, ins, outs = self.split(shape)
        return lead + (math.prod(ins), math.prod(outs))


def kernel_layout(path: Sequence[str], shape: Sequence[int]) -> KernelLayout:
    """The layout of the kernel at `path` (parameter names, outermost first; the last is the kernel's
    own name) with `shape`. Raises if the shape has fewer than two axes besides a scan axis."""
    names = [str(n) for n in path]
    stack = int(any(n in STACK_NAMES for n in names[:-1]))
    dims = len(shape) - stack
    if dims < 2:
        raise ValueError(
            f"{'/'.join(names)} has shape {tuple(shape)}: not a linear kernel (needs >= 2 axes besides a scan axis)"
        )
    owner = names[-2] if len(names) >= 2 else ""
    n_in = dims - 1 if owner in OUTPUT_PROJECTIONS else 1
    return KernelLayout(stack, n_in, dims - n_in)
