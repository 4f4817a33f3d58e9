"""Tokenizers for MLFM shards: a local Hugging Face ``tokenizer.json``, or a byte-level BPE trained here.

Either way the result has an EOS token (documents are joined with it) and a mask token (the MLFM mask
embedding ``m = E[mask_id]``); a given tokenizer without one gets ``<|mask|>`` appended, so its id is the
old vocabulary size (SMDM: vocab 32000, mask id 32000).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlfm_scale.errors import UserError

EOS, PAD, MASK = "<|eos|>", "<|pad|>", "<|mask|>"
EOS_CANDIDATES = (EOS, "</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
MASK_CANDIDATES = (MASK, "<|mdm_mask|>", "[MASK]", "<mask>")
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(UserError):
    """A tokenizer that cannot serve MLFM shards; the message says what to change."""


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    pad: int  # fills the tail of a chunk's last block; equals ``eos`` when the tokenizer has no pad token
    mask: int


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` entries (EOS, pad and mask included) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory)
    path = path if path.is_file() else path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"no {TOKENIZER_FILE} at {directory}: give a directory holding a Hugging Face "
                             "tokenizer.json, or train one with --train-tokenizer VOCAB")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from None


def _first_present(tok: Tokenizer, names: Iterable[str]) -> int | None:
    for name in names:
        if (i := tok.token_to_id(name)) is not None:
            return i
    return None


def ensure_special_tokens(tok: Tokenizer, eos_token: str | None = None) -> SpecialIds:
    """The special ids of ``tok``, adding a mask token when it has none (mutates ``tok``)."""
    eos = _first_present(tok, [eos_token] if eos_token else EOS_CANDIDATES)
    if eos is None:
        wanted = repr(eos_token) if eos_token else f"any of {list(EOS_CANDIDATES)}"
        raise TokenizerError(f"the tokenizer has no EOS token ({wanted}); name it with --eos-token")
    mask = _first_present(tok, MASK_CANDIDATES)
    if mask is None:
        tok.add_special_tokens([MASK])
        mask = tok.token_to_id(MASK)
    pad = _first_present(tok, (PAD, "<pad>", "[PAD]"))
    return SpecialIds(eos=eos, pad=eos if pad is None else pad, mask=mask)


def tokenizer_sha256(tok: Tokenizer) -> str:
    """A content hash of the serialised tokenizer (what training checks for compatibility)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()
