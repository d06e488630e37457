"""Sentencepiece text tokenizer with OpenVLA's extra `<PAD>` token.

Reads `tokenizer.model` from a checkpoint directory (or the file itself). Llama 2: 32000 pieces,
BOS 1, EOS 2, and `<PAD>` = 32000 appended after the sentencepiece vocabulary.
"""

from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm


class TextTokenizer:
    """`encode(text) -> list[int]` (BOS prepended, no EOS by default); `decode(ids) -> str`."""

    def __init__(self, path: str, pad_id: int | None = None):
        model = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.exists(model):
            raise FileNotFoundError(
                f"no sentencepiece model at {model!r} (expected `tokenizer.model` from the checkpoint directory)"
            )
        self.model_path = model
        self.sp = spm.SentencePieceProcessor(model_file=model)
        self.sp_vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp_vocab_size if pad_id is None else int(pad_id)  # Llama: 32000
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model}: sentencepiece model has no BOS/EOS ids")
        # "▁" alone (29871 in Llama): what follows "Out:" before the first action token.
        self.space_id = self.sp.piece_to_id("\u2581")
        if self.space_id == self.sp.unk_id():
            raise ValueError(f"{model}: vocabulary has no standalone '\u2581' piece")

    @property
    def vocab_size(self) -> int:
        """Sentencepiece pieces plus `<PAD>` (32001 for Llama, before padding to 32064)."""
        return max(self.sp_vocab_size, self.pad_id + 1)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos else []) + list(ids) + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id) and 0 <= i < self.sp_vocab_size]
        return self.sp.decode(ids)

    def __getstate__(self):  # picklable for tf.data / multiprocessing
        return {"path": self.model_path, "pad_id": self.pad_id}

    def __setstate__(self, state):
        self.__init__(state["path"], state["pad_id"])
