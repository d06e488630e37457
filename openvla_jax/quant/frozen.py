"""A quantized frozen base for LoRA training: the int8 / grouped int4 kernels of `quant/weights.py`,
laid out so that `nn.scan` can slice them per layer, and a matmul that dequantizes next to its use.

    base = quantize_frozen(params, "int4")      # kernels -> {"int4": q, "scale": s}; the rest as it was
    y = frozen_linear(x, base_entry, n_in, out_shape, dtype)   # inside the jitted step

Layout of a quantized kernel `[*lead, *in, *out]` (lead: the scan axis of a stacked layer, 0 or 1),
K = prod(in), N = prod(out); the values and scales are `quant.weights.quantize`'s:
  {"int8": int8 `[*lead, *in, *out]`, "scale": float32 `[*lead, 1, N]`}       per output channel
  {"int4": int8 `[*lead, ceil(K / 2), N]`, "scale": float32 `[*lead, G, N]`}  groups of K / G input rows
int4 bytes hold input row k in the low nibble and row k + ceil(K/2) in the high one (an odd K gets
a zero row), not the inference checkpoint's flat pairs: unpacking is two shifts and a concatenation
along K, which every backend does per layer in place. With the flat pairs (`quant.weights.pack_int4`)
the TPU compiler unpacked every layer of the stack up front: 21 GB of temporaries for the 7B step on
a 16 GB v5e chip, at any batch (BENCHMARKS.md, LoRA). Every leaf has the lead axis first, which is
what `nn.scan` slices.

Why the grouped int4 and not NF4 (bitsandbytes' 4-bit, the original's `--use_quantization`): its
values and scales are those inference already uses (`OpenVLA(quantize="int4")`), tested against fp32
there; its dequantization is one integer multiply by a per-(group, channel) scale that
XLA fuses on every backend, where NF4 needs a 16-entry table lookup and a second, quantized level of
scales. Both store 4 bits per weight; at group 128 the fp32 scales add 0.25 bits (NF4 at block 64
with double quantization: ~0.13).

`frozen_linear` is a custom VJP: the backward pass dequantizes again for `dx = dy W^T` instead of
keeping the dequantized kernel as a residual, so a step never holds more than the layer at hand in
float, with or without remat; the kernel gets no gradient at all (it is frozen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from openvla_jax.quant.weights import DEFAULT_GROUP_SIZE, MODES, QTensor, is_qtensor, quantize_params, unpack_int4

BASE_QUANT = ("none",) + MODES


def is_frozen_quant(x) -> bool:
    """Whether `x` is a quantized kernel entry of `quantize_frozen`."""
    return isinstance(x, Mapping) and "scale" in x and ("int8" in x or "int4" in x)


def _entry(qt: QTensor) -> dict:
    """A host QTensor -> the entry of the layout above (int4: its values repacked by halves of K)."""
    if qt.bits == 8:
        return {"int8": np.asarray(qt.q), "scale": np.asarray(qt.scale)}
    lead = qt.shape[: qt.lead]
    k = math.prod(qt.shape[qt.lead : qt.lead + qt.in_dims])
    v = np.asarray(unpack_int4(qt.q, qt.grouped_shape)).reshape(*lead, k, -1)
    if k % 2:  # an odd K: one zero row of padding, dropped when unpacking
        v = np.concatenate([v, np.zeros_like(v[..., :1, :])], axis=-2)
    half = v.shape[-2] // 2
    low, high = v[..., :half, :].astype(np.uint8), v[..., half:, :].astype(np.uint8)
    packed = ((low & 0x0F) | (high << 4)).astype(np.uint8).view(np.int8)
    return {"int4": packed, "scale": np.asarray(qt.scale)}


def quantize_frozen(params, mode: str, group_size: Optional[int] = DEFAULT_GROUP_SIZE):
    """Params tree (NumPy or arrays) -> the same tree with every linear kernel a quantized entry (host
    NumPy, one kernel at a time on the default device: `quant.weights.quantize_params`)."""
    if mode not in MODES:
        raise ValueError(f"base_quant={mode!r}: expected one of {BASE_QUANT}")
    q = quantize_params(params, mode, group_size)
    return jax.tree.map(lambda x: _entry(x) if is_qtensor(x) else x, q, is_leaf=is_qtensor)


def abstract_frozen(shapes, mode: str, group_size: Optional[int] = DEFAULT_GROUP_SIZE):
    """`quantize_frozen` on `jax.ShapeDtypeStruct`s: the quantized base's shapes, nothing computed."""
    from openvla_jax.quant.memory import quantized_shapes

    def entry(qt: QTensor) -> dict:
        scale = jax.ShapeDtypeStruct(qt.scale.shape, qt.scale.dtype)
        if qt.bits == 8:
            return {"int8": jax.ShapeDtypeStruct(qt.shape, np.int8), "scale": scale}
        lead, (g, n) = qt.shape[: qt.lead], qt.grouped_shape[-2:]
        return {"int4": jax.ShapeDtypeStruct((*lead, (g * qt.groups + 1) // 2, n), np.int8), "scale": scale}

    q = quantized_shapes(shapes, mode, group_size)
    return jax.tree.map(lambda x: entry(x) if is_qtensor(x) else x, q, is_leaf=is_qtensor)


def _values(entry: Mapping, lead: tuple, k: int, n: int):
    """The int8 values `[*lead, K, N]` of an entry."""
    if "int8" in entry:
        return entry["int8"].reshape(*lead, k, n)
    q = entry["int4"]
    four = np.int8(4)
    low = jax.lax.shift_right_arithmetic(jax.lax.shift_left(q, four), four)  # sign-extended nibbles
    high = jax.lax.shift_right_arithmetic(q, four)
    return jnp.concatenate([low, high], axis=-2)[..., :k, :]


def _dequantize(entry: Mapping, lead: tuple, k: int, n: int, dtype):
    """An entry -> its kernel as a `[*lead, K, N]` matrix in `dtype` (values x their group's scale)."""
    scale = entry["scale"]
    g = scale.shape[-2]
    v = _values(entry, lead, k, n).reshape(*lead, g, k // g, n)
    return (v.astype(dtype) * jnp.expand_dims(scale, -2).astype(dtype)).reshape(*lead, k, n)


def dequantize_frozen(params, dtype, shapes):
    """Every quantized entry -> a `dtype` kernel of its shape in `shapes` (a params tree of shapes,
    e.g. the model's abstract params): for evaluation and merging, never the training step."""
    from openvla_jax.models import kernels
    from openvla_jax.train.optimizer import param_paths

    paths = param_paths(shapes)

    def one(path, shape, x):
        if not is_frozen_quant(x):
            return x
        layout = kernels.kernel_layout(path.split("/"), shape.shape)
        lead, ins, outs = layout.split(shape.shape)
        return _dequantize(x, lead, math.prod(ins), math.prod(outs), dtype).reshape(shape.shape)

    return jax.tree.map(one, paths, shapes, params, is_leaf=lambda x: is_frozen_quant(x))


def frozen_linear(x, entry: Mapping, n_in: int, out_shape: tuple, dtype):
    """`x [..., *in] @ W [*in, *out]` for a quantized frozen kernel of one layer (no scan axis left):
    -> `[..., *out]` in `dtype`. The gradient flows to `x` only."""
    in_shape = tuple(x.shape[x.ndim - n_in :])
    k, n = math.prod(in_shape), math.prod(out_shape)
    lead = x.shape[: x.ndim - n_in]
    y = _qmatmul(x.reshape(-1, k).astype(dtype), dict(entry), k, n, dtype)
    return y.reshape(lead + tuple(out_shape))


def _qmatmul(x, entry: dict, k: int, n: int, dtype):
    """`x [M, K] @ dequantize(entry) [K, N]`, differentiable in `x` alone; the backward pass
    dequantizes again (nothing float of the kernel is saved for it)."""

    @jax.custom_vjp
    def f(x, entry):
        return x @ _dequantize(entry, (), k, n, dtype)

    def fwd(x, entry):
        return f(x, entry), entry

    def bwd(entry, g):
        dx = (g @ _dequantize(entry, (), k, n, dtype).T).astype(x.dtype)
        return dx, jax.tree.map(lambda _: None, entry)

    f.defvjp(fwd, bwd)
    return f(x, entry)
