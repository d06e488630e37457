"""Weight-only int8 / int4 quantization of the VLA's linear kernels, and dequantization under jit.

Which leaves: every Dense / DenseGeneral `kernel` (Llama q/k/v/o, gate/up/down, lm_head; ViT qkv,
proj, fc1, fc2 and the SigLIP attention-pool q/kv/proj/mlp; projector fc1..3). Not embeddings,
norms, biases, LayerScale, pos/cls/register tokens or the patch-embed conv: they are small, or (the
embedding table) a gather, not a matmul.

Layout. A kernel is `[*lead, *in_dims, *out_dims]`: `lead` is the stacked layer axis of a scanned
Llama or ViT (`language_model/layers/...`, `.../blocks/...`), `in_dims` the contracted input axes (two
for o_proj / ViT proj, which contract `(heads, head_dim)`; one otherwise; see `models/kernels.py`).
It is viewed as `[*lead, K, N]` with K the product of the input dims and N of the output dims,
and K split into G groups of g = K / G rows:
  int8: symmetric per output channel (G = 1): scale = max|w| / 127 over the K input rows.
  int4: symmetric per (group of `group_size` input rows, output channel): scale = max|w| / 7; a K
        that `group_size` does not divide falls back to per channel (G = 1). Two signed nibbles per
        int8 byte (element 2i in the low nibble, 2i+1 in the high one) over the flattened
        `[*lead, G, g, N]` array, padded with one zero nibble when the count is odd.
Scales are float32 `[*lead, G, N]` (a few % of the int4 bytes at g >= 64; exact, so the rounding
bound |w - deq| <= scale / 2 holds against the stored scale).

`dequantize_tree(params, dtype)` is meant to run inside the jitted forward: the int8 arrays are
what lives in device memory and `q * scale` is traced next to its use, where XLA can fuse it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from openvla_jax.models import kernels

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
_QMAX = {8: 127, 4: 7}


@struct.dataclass
class QTensor:
    """A quantized kernel. `q`: int8 `shape` (int8) or packed int4 bytes `[ceil(n / 2)]` (int4);
    `scale`: float32 `[*lead, G, N]`. The rest is static metadata (not traced under jit)."""

    q: Any
    scale: Any
    bits: int = struct.field(pytree_node=False)
    shape: tuple = struct.field(pytree_node=False)  # the float kernel's shape
    lead: int = struct.field(pytree_node=False)  # leading stacked-layer axes
    in_dims: int = struct.field(pytree_node=False)  # contracted input axes after `lead`
    groups: int = struct.field(pytree_node=False)  # G

    @property
    def grouped_shape(self) -> tuple:
        """`[*lead, G, g, N]`: the view the scale broadcasts against."""
        lead = self.shape[: self.lead]
        k = math.prod(self.shape[self.lead : self.lead + self.in_dims])
        n = math.prod(self.shape[self.lead + self.in_dims :])
        return (*lead, self.groups, k // self.groups, n)

    def metadata(self) -> dict:
        return dict(bits=self.bits, shape=list(self.shape), lead=self.lead, in_dims=self.in_dims, groups=self.groups)


def is_qtensor(x) -> bool:
    return isinstance(x, QTensor)


# --------------------------------------------------------------------------------- int4 packing
def pack_int4(values):
    """Signed int4 values in [-8, 7] (any shape) -> int8 bytes `[ceil(n / 2)]`."""
    flat = jnp.ravel(jnp.asarray(values, jnp.int8))
    if flat.shape[0] % 2:
        flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.int8)])
    pairs = flat.reshape(-1, 2).astype(jnp.uint8)
    packed = (pairs[:, 0] & 0x0F) | ((pairs[:, 1] & 0x0F) << 4)
    return jax.lax.bitcast_convert_type(packed, jnp.int8)


def unpack_int4(packed, shape) -> jax.Array:
    """Inverse of `pack_int4`: int8 bytes -> int8 values in [-8, 7] of `shape`. Arithmetic shifts
    sign-extend each nibble."""
    p = jnp.asarray(packed, jnp.int8)
    low = jnp.right_shift(jnp.left_shift(p, 4), 4)
    high = jnp.right_shift(p, 4)
    flat = jnp.stack([low, high], axis=-1).reshape(-1)
    return flat[: math.prod(shape)].reshape(shape)


# ------------------------------------------------------------------------------ one kernel
def quantize(w, bits: int, lead: int = 0, in_dims: int = 1, group_size: Optional[int] = None) -> QTensor:
    """Float kernel `w` `[*lead, *in, *out]` -> QTensor. `group_size` applies to int4 only (None:
    per channel). Traceable (shapes decide everything), so `jax.eval_shape` sizes a 7B model."""
    if bits not in _QMAX:
        raise ValueError(f"bits={bits}: expected 8 or 4")
    shape = tuple(w.shape)
    if w.ndim < lead + in_dims + 1:
        raise ValueError(f"kernel of shape {shape} has no output axis after lead={lead}, in_dims={in_dims}")
    k = math.prod(shape[lead : lead + in_dims])
    groups = 1
    if bits == 4 and group_size is not None:
        if group_size <= 0:
            raise ValueError(f"group_size={group_size}: expected a positive number of input rows")
        if k % group_size == 0:
            groups = k // group_size
    qt = QTensor(None, None, bits, shape, lead, in_dims, groups)
    x = jnp.asarray(w, jnp.float32).reshape(qt.grouped_shape)
    amax = jnp.max(jnp.abs(x), axis=-2, keepdims=True)
    qmax = _QMAX[bits]
    scale = jnp.where(amax > 0, amax / qmax, 1.0)  # an all-zero column: any scale, q = 0
    q = jnp.clip(jnp.round(x / scale), -qmax, qmax).astype(jnp.int8)
    q = q.reshape(shape) if bits == 8 else pack_int4(q)
    return dataclasses.replace(qt, q=q, scale=jnp.squeeze(scale, axis=-2))


def dequantize(qt: QTensor, dtype=jnp.bfloat16) -> jax.Array:
    """QTensor -> kernel of `qt.shape` in `dtype` (`q * scale`, multiplied in `dtype`)."""
    gshape = qt.grouped_shape
    q = qt.q.reshape(gshape) if qt.bits == 8 else unpack_int4(qt.q, gshape)
    w = q.astype(dtype) * jnp.expand_dims(qt.scale, -2).astype(dtype)
    return w.reshape(qt.shape)


# -------------------------------------------------------------------------------- whole trees
def _path_names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def linear_layout(names: list[str], ndim: int) -> Optional[tuple[int, int]]:
    """`(lead, in_dims)` when the leaf at `names` is a linear kernel to quantize, else None (the axes
    come from `models.kernels`, as LoRA's and conversion's do)."""
    if not names or names[-1] != "kernel" or "patch_embed" in names or ndim < 2:
        return None
    try:
        layout = kernels.kernel_layout(names, (1,) * ndim)
    except ValueError:  # fewer than two axes besides a scan axis: not a matmul
        return None
    return layout.stack, layout.n_in


def quantize_params(params, mode: str = "int8", group_size: Optional[int] = DEFAULT_GROUP_SIZE):
    """Params tree -> the same tree with every linear kernel a QTensor (others untouched).
    `mode`: "int8" (per channel; `group_size` ignored) or "int4" (grouped along the input)."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {MODES}")
    bits = 8 if mode == "int8" else 4
    quant = jax.jit(quantize, static_argnums=(1, 2, 3, 4))

    def leaf(path, x):
        layout = linear_layout(_path_names(path), np.ndim(x))
        if layout is None:
            return x
        qt = quant(x, bits, *layout, group_size)
        return jax.tree.map(np.asarray, qt)  # host copies: at rest only the int8 bytes are kept

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(params))


def dequantize_tree(params, dtype=jnp.bfloat16):
    """Every QTensor -> a `dtype` kernel; call inside the jitted function (see module docstring)."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_qtensor(x) else x, params, is_leaf=is_qtensor)


def is_quantized(params) -> bool:
    return any(is_qtensor(x) for x in jax.tree.leaves(params, is_leaf=is_qtensor))


def quant_mode(params) -> Optional[str]:
    """ "int8", "int4", or None for a float tree."""
    bits = {x.bits for x in jax.tree.leaves(params, is_leaf=is_qtensor) if is_qtensor(x)}
    if len(bits) > 1:
        raise ValueError(f"params mix quantization widths {sorted(bits)}")
    return {8: "int8", 4: "int4"}.get(bits.pop()) if bits else None


def cast_floats(params, dtype):
    """Device arrays: non-quantized leaves in `dtype`, QTensors as they are (int8 + float32 scales)."""
    return jax.tree.map(
        lambda x: jax.tree.map(jnp.asarray, x) if is_qtensor(x) else jnp.asarray(x, dtype), params, is_leaf=is_qtensor
    )


def _nbytes(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def param_bytes(params) -> int:
    """Bytes of the linear-layer weights: QTensor q + scale, or the float kernel. Works on arrays
    and on `jax.eval_shape` structs alike."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params), is_leaf=is_qtensor)[0]:
        if is_qtensor(x):
            total += _nbytes(x.q) + _nbytes(x.scale)
        elif linear_layout(_path_names(path), len(x.shape)) is not None:
            total += _nbytes(x)
    return total


def total_bytes(params) -> int:
    """Bytes of every leaf (QTensors count q + scale)."""
    leaves = jax.tree.leaves(nn.meta.unbox(params), is_leaf=is_qtensor)
    return sum(_nbytes(x.q) + _nbytes(x.scale) if is_qtensor(x) else _nbytes(x) for x in leaves)


class DequantizingModule:
    """A VLA module whose `apply` takes quantized params and dequantizes them in the trace; every
    other attribute is the wrapped module's. Lets `decoding.greedy_decode` (which calls `module.apply`
    for the prefill and inside its decode loop) run on a quantized tree unchanged."""

    def __init__(self, module, dtype):
        self._module = module
        self._dtype = dtype

    def __getattr__(self, name):
        return getattr(self._module, name)

    def apply(self, variables, *args, **kwargs):
        variables = dict(variables, params=dequantize_tree(variables["params"], self._dtype))
        return self._module.apply(variables, *args, **kwargs)
