"""`OpenVLA`: load a checkpoint and act, in jitted batches.

    from openvla_jax import OpenVLA
    vla = OpenVLA.load("path/to/openvla-7b")            # an HF directory or a converted one
    actions = vla.predict_action(images, ["pick up the red block"] * len(images), unnorm_key="bridge_orig")

Batches are padded to a bucket (batch: next power of two; prompt length: next multiple of 16), so
the greedy decoder compiles once per bucket, not once per call. Padding rows and padding tokens never
change a row's result: each row decodes at its own length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from openvla_jax import quant
from openvla_jax.data.normalize import action_stats, unnormalize
from openvla_jax.models import vla as vla_lib
from openvla_jax.models.common import as_dtype
from openvla_jax.models.preprocess import preprocess_images
from openvla_jax.models.vision import to_nhwc
from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.tokenizer.prompt import inference_prompt_ids

LLAMA_SPACE_ID = 29871  # "▁": the token before the first action token
LENGTH_BUCKET = 16


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class OpenVLA:
    def __init__(self, model_config: ml_collections.ConfigDict, params, norm_stats: Optional[dict] = None,
                 tokenizer_dir: Optional[os.PathLike] = None, dtype="bfloat16", quantize: Optional[str] = None,
                 group_size: Optional[int] = quant.DEFAULT_GROUP_SIZE):
        """`quantize`: None, "int8" or "int4" (weight-only, see `openvla_jax.quant`); params that are
        already quantized (from `quant.load_quantized`) are used as they are. Quantized kernels stay
        int8 in memory and are dequantized to `dtype` inside the jitted calls."""
        dtype = as_dtype(dtype)
        self.config = model_config
        self.module = vla_lib.from_config(model_config, dtype=dtype, param_dtype=dtype, scan_layers=_is_scanned(params))
        have = quant.quant_mode(params)
        if quantize is not None and have is None:
            params = quant.quantize_params(params, quantize, group_size)
        elif quantize is not None and quantize != have:
            raise ValueError(f"quantize={quantize!r}, but the params are already quantized as {have!r}")
        self.quantization = quant.quant_mode(params)
        self.params = quant.cast_floats(params, dtype)
        self.norm_stats = dict(norm_stats or {})
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None
        self.action_tokenizer = ActionTokenizer.for_model(model_config)
        self.action_dim = model_config.get("action_dim", 7)
        module = self.module
        if self.quantization is not None:
            module = quant.DequantizingModule(module, dtype)  # dequantize in the trace, next to each use
        self._logits = jax.jit(lambda p, pv, ids, m: module.apply({"params": p}, pv, ids, m))
        self._decode = jax.jit(
            lambda p, pv, ids, m: vla_lib.greedy_decode(module, p, pv, ids, m, num_tokens=self.action_dim)
        )

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Union[str, os.PathLike], dtype="bfloat16", quantize: Optional[str] = None,
             group_size: Optional[int] = quant.DEFAULT_GROUP_SIZE) -> "OpenVLA":
        """An HF OpenVLA directory (`config.json` + safetensors), a `scripts/convert.py to-jax` one, or
        a `quant.save_quantized` one. `quantize` ("int8" / "int4") quantizes a float checkpoint on load."""
        from openvla_jax.convert import hf

        path = Path(path)
        if quant.is_quantized_dir(path):
            model_config, params, extras = quant.load_quantized(path)
        elif (path / "model_config.json").exists():
            model_config, params, extras = hf.load_converted(path)
        elif (path / "config.json").exists():
            model_config, params, extras = hf.load_hf(path)
        else:
            raise FileNotFoundError(
                f"{path} is not an OpenVLA checkpoint: expected config.json (HF) or model_config.json "
                "(converted with scripts/convert.py to-jax) or quant_config.json (quant.save_quantized)"
            )
        tok_dir = path if (path / "tokenizer.model").exists() else None
        return cls(model_config, params, extras.get("norm_stats"), tok_dir, dtype, quantize, group_size)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_dir is None:
                raise FileNotFoundError(
                    "predict_action needs the checkpoint's tokenizer files (tokenizer.model), which this "
                    "checkpoint directory lacks; copy them in, or call action_token_ids with input_ids"
                )
            from openvla_jax.tokenizer.text import TextTokenizer

            self._tokenizer = TextTokenizer(str(self.tokenizer_dir))
        return self._tokenizer

    # -------------------------------------------------------------------------------- model calls
    def logits(self, pixel_values, input_ids, attention_mask=None) -> np.ndarray:
        """pixel_values `[B, 6, 224, 224]` (HF layout; NHWC also accepted), input_ids `[B, T]` ->
        logits `[B, T + 256, V]` in the HF model's positions."""
        pv = self._pixels(pixel_values)
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        return np.asarray(self._logits(self.params, pv, ids, mask))

    def action_token_ids(self, pixel_values, input_ids, attention_mask=None) -> np.ndarray:
        """Greedy action ids `[B, 7]`. Rows are right-padded prompts (mask marks real tokens); the
        "▁" token is appended to a row that does not already end with it, as the original does."""
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask, bool)
        space = self._tokenizer.space_id if self._tokenizer is not None else LLAMA_SPACE_ID
        rows = []
        for row, m in zip(ids, mask):
            row = [int(t) for t in row[m]]
            rows.append(row if row and row[-1] == space else row + [space])
        return self._decode_rows(self._pixels(pixel_values), rows)

    def predict_action(self, images, instructions: Union[str, Sequence[str]], unnorm_key: Optional[str] = None) -> np.ndarray:
        """images: uint8 `[B, H, W, 3]` or a list of `[H, W, 3]`; instructions: one string per image.
        Returns un-normalised actions `[B, 7]` (float64, as the original computes them)."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        if isinstance(instructions, str):
            instructions = [instructions]
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
        stats = action_stats(self.norm_stats, unnorm_key)  # fail early on a bad unnorm_key
        rows = [inference_prompt_ids(self.tokenizer, text) for text in instructions]
        ids = self._decode_rows(preprocess_images(images, self.config.vision.get("image_size", 224)), rows)
        normalized = self.action_tokenizer.decode(ids).astype(np.float64)
        return unnormalize(normalized, stats)

    # ---------------------------------------------------------------------------------- internals
    def _pixels(self, pixel_values) -> np.ndarray:
        pv = np.asarray(pixel_values, np.float32)
        if pv.ndim == 4 and pv.shape[1] == 6 and pv.shape[-1] != 6:
            pv = to_nhwc(pv, 6)
        return pv

    def _decode_rows(self, pixel_values: np.ndarray, rows: list[list[int]]) -> np.ndarray:
        b = len(rows)
        bb = _bucket(b)
        t = -(-max(len(r) for r in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
        ids = np.zeros((bb, t), np.int32)
        mask = np.zeros((bb, t), bool)
        for i, r in enumerate(rows + [rows[0]] * (bb - b)):  # pad the batch with copies of row 0
            ids[i, : len(r)] = r
            mask[i, : len(r)] = True
        pv = np.concatenate([pixel_values, np.repeat(pixel_values[:1], bb - b, axis=0)]) if bb > b else pixel_values
        out = self._decode(self.params, pv, ids, mask)
        return np.asarray(out)[:b]


def _is_scanned(params) -> bool:
    return "layers" in params.get("language_model", {})
