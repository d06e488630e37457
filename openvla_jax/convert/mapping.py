"""Key-by-key mapping between PyTorch state dicts and Flax parameter trees.

A model file describes its checkpoint as a list of `ParamSpec`s (one per PyTorch tensor); the two
functions here move tensors through that list in either direction. Every transform is a transpose
and/or reshape, so a round trip is bit-exact in any dtype. Stacked (scanned) layers are one Flax
array whose axis 0 is the layer index; each PyTorch tensor of layer i fills slice i.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional, Sequence

import numpy as np

from openvla_jax.convert.io import check_state_dict
from openvla_jax.models import kernels


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One PyTorch tensor and where it lives in the Flax tree.

    kind "linear": torch `[out, in]` weight <-> Flax kernel `[in..., out...]` (transpose + reshape);
    kind "copy": same values, possibly reshaped (biases, norms, embeddings, conv kernels use "conv").
    kind "conv": torch `[out, in, kh, kw]` <-> Flax `[kh, kw, in, out]`.
    """

    hf_key: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    kind: str = "copy"
    layer: Optional[int] = None  # index along axis 0 of a stacked Flax array
    num_layers: Optional[int] = None  # size of that axis

    @property
    def stacked_shape(self) -> tuple[int, ...]:
        if self.layer is None:
            return self.flax_shape
        if self.num_layers is None:
            raise ValueError(f"{self.hf_key}: a stacked spec (layer={self.layer}) needs num_layers")
        return (self.num_layers, *self.flax_shape)


def linear_matrix(spec: ParamSpec) -> tuple[int, int]:
    """`(K, N)` of a "linear" spec's Flax kernel, from `models.kernels` (the layout LoRA and
    quantization use); it must be the transpose of the PyTorch weight `[N, K]`."""
    shape = spec.stacked_shape
    k, n = kernels.kernel_layout(spec.path, shape).matrix_shape(shape)[-2:]
    if (n, k) != tuple(spec.hf_shape):
        raise ValueError(
            f"{spec.hf_key}: the Flax kernel {spec.path} {spec.flax_shape} contracts {k} inputs to "
            f"{n} outputs, but the PyTorch weight is {spec.hf_shape} [out, in]"
        )
    return k, n


def to_flax(w: np.ndarray, spec: ParamSpec) -> np.ndarray:
    w = np.asarray(w)
    if spec.kind == "linear":
        k, n = linear_matrix(spec)
        return np.ascontiguousarray(w.reshape(n, k).T).reshape(spec.flax_shape)
    if spec.kind == "conv":
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(spec.flax_shape)
    if spec.kind == "copy":
        return w.reshape(spec.flax_shape)
    raise ValueError(f"unknown ParamSpec kind {spec.kind!r}")


def to_hf(x: np.ndarray, spec: ParamSpec) -> np.ndarray:
    x = np.asarray(x)
    if spec.kind == "linear":
        k, n = linear_matrix(spec)
        return np.ascontiguousarray(x.reshape(k, n).T)
    if spec.kind == "conv":
        out, inp, kh, kw = spec.hf_shape
        return np.ascontiguousarray(x.reshape(kh, kw, inp, out).transpose(3, 2, 0, 1))
    if spec.kind == "copy":
        return np.ascontiguousarray(x.reshape(spec.hf_shape))
    raise ValueError(f"unknown ParamSpec kind {spec.kind!r}")


def _shape_of(v: Any) -> tuple[int, ...]:
    return tuple(v.shape)


def iter_hf_to_flax(
    specs: Sequence[ParamSpec],
    state: Mapping[str, Any],
    source: str = "checkpoint",
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
    dtype: Optional[np.dtype] = None,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield `(flax_path, array)` one Flax array at a time, reading from a (lazy) state dict.

    The keys and shapes are checked first (missing, unexpected and misshapen keys all listed), so
    nothing is yielded from a checkpoint that does not match. A stacked (scanned) array is built
    from its layers' tensors before it is yielded; otherwise one tensor is in memory at a time.
    `shapes` lets a lazy reader announce shapes without reading data (defaults to `state[k].shape`).
    """
    got = dict(shapes) if shapes is not None else {k: _shape_of(v) for k, v in state.items()}
    check_state_dict({s.hf_key: s.hf_shape for s in specs}, got, source)
    by_path: dict[tuple[str, ...], list[ParamSpec]] = {}
    for spec in specs:  # insertion order: the specs' order of first appearance
        by_path.setdefault(spec.path, []).append(spec)
    for path, group in by_path.items():
        value = None
        for spec in group:
            w = state[spec.hf_key]
            if dtype is not None:
                w = np.asarray(w).astype(dtype, copy=False)
            w = to_flax(w, spec)
            if spec.layer is None:
                value = w
            else:
                if value is None:
                    value = np.empty(spec.stacked_shape, w.dtype)
                value[spec.layer] = w
        assert value is not None  # every group holds at least one spec
        yield path, value


def hf_to_flax(
    specs: Sequence[ParamSpec],
    state: Mapping[str, Any],
    source: str = "checkpoint",
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
    dtype: Optional[np.dtype] = None,
) -> dict:
    """Build the nested Flax params dict from a (lazy) state dict (see `iter_hf_to_flax`)."""
    return unflatten_params(iter_hf_to_flax(specs, state, source, shapes, dtype))


def unflatten_params(items) -> dict:
    """`(path tuple, value)` pairs -> nested dict."""
    params: dict = {}
    for path, value in items:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return params


def flatten_params(params: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            flat.update(flatten_params(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def check_flax_params(specs: Sequence[ParamSpec], params: Mapping, source: str = "Flax params"):
    """Raise StateDictError unless `params` holds exactly the arrays the specs describe."""
    expected = {"/".join(s.path): s.stacked_shape for s in specs}
    got = {"/".join(p): _shape_of(v) for p, v in flatten_params(params).items()}
    check_state_dict(expected, got, source)


def hf_getter(specs: Sequence[ParamSpec], params: Mapping, source: str = "Flax params") -> Callable[[str], np.ndarray]:
    """Check `params` against the specs, then return `get(hf_key) -> array` producing one PyTorch
    tensor on demand (what `write_safetensors` streams from; device arrays are fetched lazily)."""
    check_flax_params(specs, params, source)
    flat = flatten_params(params)
    by_key = {s.hf_key: s for s in specs}

    def get(key: str) -> np.ndarray:
        spec = by_key[key]
        value = flat[spec.path] if spec.layer is None else flat[spec.path][spec.layer]
        return to_hf(np.asarray(value), spec)

    return get


def flax_to_hf(
    specs: Sequence[ParamSpec], params: Mapping, source: str = "Flax params"
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_key, array)` in spec order, one at a time."""
    get = hf_getter(specs, params, source)
    for spec in specs:
        yield spec.hf_key, get(spec.hf_key)
