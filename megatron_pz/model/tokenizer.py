"""Tokenizers: the HF tokenizer of a model folder, or a SentencePiece ``.model`` file (Megatron-LM's
``--tokenizer-type SentencePieceTokenizer``), behind one small interface.

``load_tokenizer(path)`` accepts an HF model folder, a Megatron checkpoint root converted by us (its
``hf_tokenizer/`` folder), or a ``.model`` file. Loading never touches the network. Which folder holds the
tokenizer of a ``load`` value (checkpoint, training run, smollm2) is ``convert.source.tokenizer_dir``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from megatron_pz.errors import ConfigError

# Any of these marks a folder as holding a tokenizer (HF fast/slow tokenizers, SentencePiece, GPT-2 BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / f).exists() for f in TOKENIZER_FILES)


class Tokenizer(Protocol):
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None: ...


class HFTokenizer:
    """Wraps ``transformers.AutoTokenizer`` (local files only)."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"cannot load an HF tokenizer from {folder}: {exc}") from None
        self.eos_token_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS: prompts are assembled from templates that say exactly what they contain.
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not getattr(self.tok, "chat_template", None):
            return None
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class SentencePieceTokenizer:
    """A SentencePiece model file, as Megatron-LM's SentencePieceTokenizer uses it (no chat template)."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as exc:
            raise ConfigError(f"cannot load SentencePiece model {model_file}: {exc}") from None
        eos = self.sp.eos_id()
        self.eos_token_id = eos if eos >= 0 else None
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        return None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """HF folder, Megatron checkpoint root (with hf_tokenizer/), or SentencePiece ``.model`` file."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".model":
            return SentencePieceTokenizer(p)
        raise ConfigError(f"unrecognised tokenizer file {p} (expected a SentencePiece .model)")
    if (p / "hf_tokenizer").is_dir():  # a Megatron checkpoint root written by `megatron-pz convert`
        p = p / "hf_tokenizer"
    if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
        return HFTokenizer(p)
    if (p / "tokenizer.model").exists():
        return SentencePieceTokenizer(p / "tokenizer.model")
    raise ConfigError(f"no tokenizer found at {p} (expected tokenizer.json, tokenizer_config.json, "
                      f"tokenizer.model, or a Megatron checkpoint with hf_tokenizer/)")
