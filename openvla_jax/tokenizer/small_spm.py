"""A small Llama-like sentencepiece model trained on a task's instructions (the demo data, benchmarks).

The released checkpoints ship Llama 2's `tokenizer.model` (32000 pieces); nothing can be downloaded
here, so the demo and the tests train their own: BPE with byte fallback, digits split, whitespace
kept, ids unk 0 / bos 1 / eos 2 as Llama. The prompt builder needs the piece "▁" (checked).
"""

from __future__ import annotations

import io
import os
from typing import Sequence

from openvla_jax.tokenizer.prompt import PROMPT_TEMPLATE


def train_sentencepiece(instructions: Sequence[str], vocab_size: int = 400) -> bytes:
    """-> the serialized model (bytes) trained on the instructions and their prompts."""
    import sentencepiece as spm

    texts = [s.lower() for s in instructions]
    sentences = [PROMPT_TEMPLATE.format(instruction=t) for t in texts] + list(texts)
    sentences.append(PROMPT_TEMPLATE.format(instruction=""))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    if sp.piece_to_id("▁") == sp.unk_id():
        raise RuntimeError("trained tokenizer lacks the piece '▁' that the prompt builder appends")
    return proto


def write_sentencepiece(out_dir, instructions: Sequence[str], vocab_size: int = 400) -> str:
    """Train and write `out_dir/tokenizer.model`; returns `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(train_sentencepiece(instructions, vocab_size))
    return str(out_dir)
