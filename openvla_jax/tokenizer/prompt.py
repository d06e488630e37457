"""OpenVLA prompt: token ids and labels built directly (no string round trip through action text).

Training sequence (OpenVLA's `PurePromptBuilder` + `RLDSBatchTransform`):
    BOS + sp("In: What action should the robot take to {instruction.lower()}?\\nOut:") + [▁]
        + 7 action ids + [EOS]
which is what the original gets from tokenising "In: ...?\\nOut: " + action string + "</s>" with BOS.
Labels are -100 everywhere except the 7 action ids and the EOS (8 supervised positions).
"""

from __future__ import annotations

import numpy as np

from openvla_jax.tokenizer.actions import ActionTokenizer
from openvla_jax.tokenizer.text import TextTokenizer

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"


def prompt_text(instruction: str) -> str:
    """The inference prompt text (no trailing space): instruction lower-cased as in the original."""
    return PROMPT_TEMPLATE.format(instruction=instruction.lower())


def prompt_prefix_ids(tok: TextTokenizer, instruction: str) -> list[int]:
    """BOS + prompt + "▁": every token of a training example that comes before the actions."""
    ids = tok.encode(prompt_text(instruction), add_bos=True)
    return ids + [tok.space_id]


def inference_prompt_ids(tok: TextTokenizer, instruction: str) -> list[int]:
    """Prompt for `predict_action`: append "▁" (29871) unless tokenisation already ends with it."""
    ids = tok.encode(prompt_text(instruction), add_bos=True)
    if ids[-1] != tok.space_id:
        ids.append(tok.space_id)
    return ids


def training_example(
    tok: TextTokenizer, act_tok: ActionTokenizer, instruction: str, action: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One example: (`input_ids [L]`, `labels [L]`) int32 for a normalised action `[D]`."""
    prefix = prompt_prefix_ids(tok, instruction)
    act_ids = act_tok.encode(np.asarray(action).reshape(-1)).tolist()
    ids = np.array(prefix + act_ids + [tok.eos_id], np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[len(prefix) :] = ids[len(prefix) :]
    return ids, labels
