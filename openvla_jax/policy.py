"""`OpenVLA`: load a checkpoint and act, in jitted batches.

    from openvla_jax import OpenVLA
    vla = OpenVLA.load("path/to/openvla-7b")            # an HF directory or a converted one
    actions = vla.predict_action(images, ["pick up the red block"] * len(images), unnorm_key="bridge_orig")

Batches are padded to a bucket (batch: next power of two; prompt length: next multiple of 16), so
the greedy decoder compiles once per bucket, not once per call. Padding rows and padding tokens never
change a row's result: each row decodes at its own length.

Models with the OFT options (`models/vla.py`) act through the same calls: `predict_action` takes
`[B, N, H, W, 3]` images for N cameras and `proprio` `[B, P]` (raw, normalised here with the
dataset's proprio statistics), and returns `[B, K, A]` for an action chunk of K (OpenVLA itself
returns `[B, A]`, as the original). Parallel decoding is one forward pass (no decode loop).

Inputs are checked where they enter and predictions before they leave: a prompt longer than the
model's context allows (or than `max_prompt_tokens`), an empty batch, an instruction that is not a
string are errors naming the row; a row whose logits or actions are not finite (NaN weights, a
broken checkpoint) raises `InvalidActionError` naming the rows, never a bin-edge action that would
move a robot at full speed. A finite prediction of a token outside the action range (an untrained
model) decodes to the nearest bin as the original does, with a warning; `strict_actions=True` makes it
an error too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union, cast

import jax
import numpy as np

from openvla_jax import quant
from openvla_jax.data.normalize import action_stats, unnormalize
from openvla_jax.models import decoding
from openvla_jax.models import vla as vla_lib
from openvla_jax.models.common import as_dtype
from openvla_jax.models.config import VLAConfig, as_config
from openvla_jax.models.preprocess import check_preprocessing, preprocess_images
from openvla_jax.models.vision import to_nhwc
from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.tokenizer.prompt import inference_prompt_ids

log = logging.getLogger(__name__)
LLAMA_SPACE_ID = 29871  # "▁": the token before the first action token


class InvalidActionError(ValueError):
    """Rows whose prediction is not an action; `rows` lists their indices in the batch."""

    def __init__(self, rows: Sequence[int], reason: str):
        self.rows = list(rows)
        super().__init__(f"rows {self.rows} of the batch predicted no valid action ({reason}); nothing to send a robot")


LENGTH_BUCKET = 16


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class OpenVLA:
    def __init__(
        self,
        model_config: VLAConfig,
        params,
        norm_stats: Optional[dict] = None,
        tokenizer_dir: Optional[os.PathLike] = None,
        dtype="bfloat16",
        quantize: Optional[str] = None,
        group_size: Optional[int] = quant.DEFAULT_GROUP_SIZE,
        image_resize: Optional[str] = None,
        center_crop: Optional[float] = None,
        max_prompt_tokens: Optional[int] = None,
        strict_actions: bool = False,
    ):
        """`quantize`: None, "int8" or "int4" (weight-only, see `openvla_jax.quant`); params that are
        already quantized (from `checkpoints.quantized.load_quantized`) are used as they are. Quantized kernels stay
        int8 in memory and are dequantized to `dtype` inside the jitted calls.

        `image_resize` ("processor", "train", "train_jpeg") and `center_crop` (area fraction, 0 =
        none) say how `predict_action` turns camera frames into pixels (`models/preprocess.py`).
        None takes the checkpoint's own: a model trained here records "train" and, when it was
        trained with random crops, center_crop 0.9, so it sees frames as its training data showed
        them; an HF checkpoint uses its processor ("processor", no crop).

        `max_prompt_tokens` caps a prompt's tokens (BOS .. "▁"); it can only lower what the context
        leaves: `max_position_embeddings` less the image patches (and proprio token) and the actions.
        `strict_actions`: a token outside the action range raises instead of decoding to a bin edge."""
        dtype = as_dtype(dtype)
        self.config = model_config = as_config(model_config)
        self.image_resize = image_resize or model_config.image_resize
        self.center_crop = float(model_config.center_crop if center_crop is None else center_crop)
        check_preprocessing(self.image_resize, self.center_crop)
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
        opts = model_config.actions
        self.action_dim, self.action_chunk = opts.action_dim, opts.action_chunk
        self.num_images, self.proprio_dim = opts.num_images, opts.proprio_dim
        self.continuous = opts.continuous
        self.max_prompt_tokens = self._prompt_budget(model_config, max_prompt_tokens)
        self.strict_actions = bool(strict_actions)
        module = self.module
        if self.quantization is not None:
            # Dequantize in the trace, next to each use; it stands in for the VLA (apply + attributes).
            module = cast(vla_lib.VLA, quant.DequantizingModule(module, dtype))
        self._logits = jax.jit(lambda p, pv, ids, m, pr: module.apply({"params": p}, pv, ids, m, pr))
        if self.module.parallel:
            self._decode = jax.jit(lambda p, pv, ids, m, pr: decoding.parallel_decode(module, p, pv, ids, m, pr))
        else:
            n = self.action_dim * self.action_chunk
            self._decode = jax.jit(
                lambda p, pv, ids, m, pr: decoding.greedy_decode(module, p, pv, ids, m, num_tokens=n, proprio=pr)
            )

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike],
        dtype="bfloat16",
        quantize: Optional[str] = None,
        group_size: Optional[int] = quant.DEFAULT_GROUP_SIZE,
        image_resize: Optional[str] = None,
        center_crop: Optional[float] = None,
    ) -> "OpenVLA":
        """An HF OpenVLA directory (`config.json` + safetensors), a `scripts/convert.py to-jax` one, or
        a `checkpoints.quantized.save_quantized` one. `quantize` ("int8" / "int4") quantizes a float checkpoint on load;
        `image_resize` / `center_crop` override the checkpoint's image preprocessing (see `__init__`)."""
        from openvla_jax.checkpoints import converted, quantized
        from openvla_jax.convert import hf

        path = Path(path)
        if quantized.is_quantized_dir(path):
            model_config, params, extras = quantized.load_quantized(path)
        elif (path / "model_config.json").exists():
            model_config, params, extras = converted.load_converted(path)
        elif (path / "config.json").exists():
            model_config, params, extras = hf.load_hf(path)
        else:
            raise FileNotFoundError(
                f"{path} is not an OpenVLA checkpoint: expected config.json (HF) or model_config.json "
                "(converted with scripts/convert.py to-jax) or quant_config.json (checkpoints.quantized.save_quantized)"
            )
        tok_dir = path if (path / "tokenizer.model").exists() else None
        return cls(
            model_config,
            params,
            extras.get("norm_stats"),
            tok_dir,
            dtype,
            quantize,
            group_size,
            image_resize,
            center_crop,
        )

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
    def logits(self, pixel_values, input_ids, attention_mask=None, proprio=None) -> np.ndarray:
        """pixel_values `[B, 6, 224, 224]` (HF layout; NHWC also accepted), input_ids `[B, T]` ->
        logits `[B, T + 256, V]` in the HF model's positions. `proprio`: normalised `[B, P]`."""
        pv = self._pixels(pixel_values)
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        return np.asarray(self._logits(self.params, pv, ids, mask, self._proprio(proprio, len(ids))))

    def action_token_ids(self, pixel_values, input_ids, attention_mask=None, proprio=None) -> np.ndarray:
        """Greedy action ids `[B, K * A]` (OpenVLA: `[B, 7]`). Rows are right-padded prompts (mask marks
        real tokens); the "▁" token is appended to a row that does not already end with it, as the
        original does. Not for a continuous-head model (it has no action tokens)."""
        if self.continuous:
            raise ValueError("this model predicts continuous actions (model.action_head='l1'): use predict_action")
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask, bool)
        space = self._tokenizer.space_id if self._tokenizer is not None else LLAMA_SPACE_ID
        rows = []
        for row, m in zip(ids, mask):
            row = [int(t) for t in row[m]]
            rows.append(row if row and row[-1] == space else row + [space])
        return self.decode_rows(self._pixels(pixel_values), rows, self._proprio(proprio, len(rows)))

    def predict_action(
        self, images, instructions: Union[str, Sequence[str]], unnorm_key: Optional[str] = None, proprio=None
    ) -> np.ndarray:
        """images: uint8 `[B, H, W, 3]` or a list of `[H, W, 3]` (N cameras: `[B, N, H, W, 3]`);
        instructions: one string per row; proprio: raw `[B, P]` for a model with a proprio token.
        Returns un-normalised actions (float64, as the original computes them): `[B, A]` for
        OpenVLA, `[B, K, A]` for a model with an action chunk of K."""
        images = np.asarray(images) if not isinstance(images, (list, tuple)) else images
        if isinstance(images, np.ndarray) and images.ndim == 3 + (self.num_images > 1):
            images = images[None]
        if isinstance(instructions, str):
            instructions = [instructions]
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
        if not len(images):
            raise ValueError("predict_action got an empty batch (no images, no instructions)")
        for i, text in enumerate(instructions):
            if not isinstance(text, str):
                raise TypeError(f"instruction {i} is {type(text).__name__}, expected a string")
        stats = action_stats(self.norm_stats, unnorm_key)  # fail early on a bad unnorm_key
        proprio = self._proprio(proprio, len(images), stats=self._proprio_stats(unnorm_key))
        rows = [inference_prompt_ids(self.tokenizer, text) for text in instructions]
        too_long = [(i, len(r)) for i, r in enumerate(rows) if len(r) > self.max_prompt_tokens]
        if too_long:
            raise ValueError(
                f"instruction(s) too long for this model: (row, prompt tokens) {too_long}; at most "
                f"{self.max_prompt_tokens} prompt tokens fit (context {self.config.llm.max_position_embeddings} "
                "less the image patches and the actions, or max_prompt_tokens)"
            )
        out = self.decode_rows(self._preprocess(images), rows, proprio)
        if self.continuous:
            bad = ~np.isfinite(out).reshape(len(rows), -1).all(1)
            if bad.any():
                raise InvalidActionError(np.flatnonzero(bad).tolist(), "non-finite continuous actions")
            normalized = out.astype(np.float64)
        else:
            nan = (out == decoding.NON_FINITE).any(1)
            if nan.any():
                raise InvalidActionError(np.flatnonzero(nan).tolist(), "non-finite logits")
            off = ~self.action_tokenizer.is_action(out).all(1)
            if off.any():
                why = (
                    f"tokens outside the action range [{self.action_tokenizer.first_id}, "
                    f"{self.action_tokenizer.vocab_size}): an untrained or wrong model?"
                )
                if self.strict_actions:
                    raise InvalidActionError(np.flatnonzero(off).tolist(), why)
                log.warning(
                    "rows %s: %s; decoded to the nearest bin, as the original", np.flatnonzero(off).tolist(), why
                )
            normalized = self.action_tokenizer.decode(out).astype(np.float64)
        if self.action_chunk > 1 or self.module.parallel:
            normalized = normalized.reshape(len(rows), self.action_chunk, self.action_dim)
        return unnormalize(normalized, stats)

    # ---------------------------------------------------------------------------------- internals
    @staticmethod
    def _prompt_budget(config: VLAConfig, cap: Optional[int]) -> int:
        """Prompt tokens that fit the context beside the image patches (+ proprio) and the actions."""
        from openvla_jax.models.vit import tower_from_config

        opts = config.actions
        patches = opts.num_images * tower_from_config(config.vision.featurizer, config.vision.image_size).num_patches
        room = (
            config.llm.max_position_embeddings - patches - (opts.proprio_dim > 0) - opts.action_dim * opts.action_chunk
        )
        if room < 2:
            raise ValueError(f"the context ({config.llm.max_position_embeddings}) leaves no room for a prompt")
        if cap is not None and cap < 2:
            raise ValueError(f"max_prompt_tokens must be at least 2 (BOS and the space), got {cap}")
        return room if cap is None else min(room, int(cap))

    def _pixels(self, pixel_values) -> np.ndarray:
        pv = np.asarray(pixel_values, np.float32)
        if pv.ndim == 4 and pv.shape[1] == 6 and pv.shape[-1] != 6:
            pv = np.asarray(to_nhwc(pv, 6))
        return pv

    def _preprocess(self, images) -> np.ndarray:
        """uint8 images -> pixel_values `[B, S, S, 6]` (`[B, N, S, S, 6]` for N cameras)."""
        size = self.config.vision.image_size
        prep = lambda ims: preprocess_images(ims, size, self.image_resize, self.center_crop)  # noqa: E731
        if self.num_images == 1:
            return prep(images)
        shapes = {np.shape(row)[:1] for row in images}
        if shapes != {(self.num_images,)}:
            raise ValueError(
                f"this model takes {self.num_images} camera images per row ([B, "
                f"{self.num_images}, H, W, 3]); got rows of {sorted(s[0] for s in shapes if s)} images"
            )
        flat = [im for row in images for im in row]
        pv = prep(flat)
        return pv.reshape(len(images), self.num_images, *pv.shape[1:])

    def _proprio_stats(self, unnorm_key):
        if not self.proprio_dim:
            return None
        from openvla_jax.data.normalize import proprio_stats

        return proprio_stats(self.norm_stats, unnorm_key)

    def _proprio(self, proprio, batch: int, stats=None):
        """None, or float32 `[B, P]` (normalised with `stats` when given), checked against the model."""
        if not self.proprio_dim:
            if proprio is not None:
                raise ValueError("this model has no proprio input (model.proprio_dim = 0), but proprio was given")
            return None
        if proprio is None:
            raise ValueError(f"this model takes proprio [B, {self.proprio_dim}] (the robot state); none given")
        p = np.asarray(proprio, np.float64)
        if p.ndim == 0 or p.size != batch * self.proprio_dim:  # (a single row's [P] is fine for B = 1)
            raise ValueError(
                f"proprio must be [B, {self.proprio_dim}] = [{batch}, {self.proprio_dim}], "
                f"got shape {np.shape(proprio)}"
            )
        p = p.reshape(batch, self.proprio_dim)
        if stats is not None:
            from openvla_jax.data.normalize import normalize

            p = normalize(p, stats)
        return p.astype(np.float32)

    def decode_rows(self, pixel_values: np.ndarray, rows: list[list[int]], proprio=None) -> np.ndarray:
        """The model's prediction for preprocessed inputs: pixel_values `[B, S, S, 6]` (NHWC; `[B, N, S,
        S, 6]` for N cameras), one prompt id list per row (BOS .. "▁", unpadded), normalised proprio
        `[B, P]` or None -> greedy action ids `[B, K * A]`, or normalised actions `[B, K, A]` for a
        continuous head. Rows are padded to the batch / length bucket here (one compile per bucket)."""
        b = len(rows)
        bb = _bucket(b)
        t = -(-max(len(r) for r in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
        ids = np.zeros((bb, t), np.int32)
        mask = np.zeros((bb, t), bool)
        for i, r in enumerate(rows + [rows[0]] * (bb - b)):  # pad the batch with copies of row 0
            ids[i, : len(r)] = r
            mask[i, : len(r)] = True
        pad = lambda x: np.concatenate([x, np.repeat(x[:1], bb - b, axis=0)]) if bb > b else x  # noqa: E731
        out = self._decode(self.params, pad(pixel_values), ids, mask, None if proprio is None else pad(proprio))
        return np.asarray(out)[:b]


def _is_scanned(params) -> bool:
    return "layers" in params.get("language_model", {})
