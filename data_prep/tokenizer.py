"""Tokenizers for MLFM shards: a local Hugging Face ``tokenizer.json``, or a byte-level BPE trained here.

Either way the result has an EOS token (documents are joined with it) and a mask token (the MLFM mask
embedding ``m = E[mask_id]``); a given tokenizer without one gets ``<|mask|>`` appended, so its id is the
old vocabulary size (SMDM: vocab 32000, mask id 32000).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
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


# GPT-2's pre-tokenisation pattern (what ByteLevel(use_regex=True) splits on), spelled for ASCII text, where
# \p{L} = [A-Za-z], \p{N} = [0-9] and Unicode White_Space = [ \t\n\v\f\r] hold exactly.
_WS = r"[ \t\n\x0b\x0c\r]"
_ASCII_PIECES = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?(?:(?!{_WS})[^A-Za-z0-9])+|{_WS}+(?!(?!{_WS})[\s\S])|{_WS}+")


class PieceCachedEncoder:
    """Encodes like ``tokenizer.encode(text, add_special_tokens=False).ids`` but caches the ids of each
    pre-token ("piece"): byte-level BPE encodes pieces independently, so a document is the concatenation of
    its pieces' ids. Natural text repeats pieces (Zipf), so most pieces are dictionary hits.

    The cache applies to byte-level BPE tokenizers without a normaliser, on ASCII documents that contain no
    added-token text; every other document (and every other tokenizer) goes through ``encode_batch``, so the
    result is always exactly the tokenizer's.
    """

    def __init__(self, tok: Tokenizer, max_pieces: int = 200_000):
        self.tok, self.max_pieces = tok, max_pieces
        spec = json.loads(tok.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        self.cached = (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                       and not pre.get("add_prefix_space") and model.get("type") == "BPE" and not model.get("dropout"))
        self.added = [t["content"] for t in spec.get("added_tokens", [])]
        self.cache: dict[str, list[int]] = {}

    def _fast(self, text: str) -> bool:
        return self.cached and text.isascii() and not any(a in text for a in self.added)

    def _piece(self, piece: str) -> list[int]:
        ids = self.tok.encode(piece, add_special_tokens=False).ids
        if len(self.cache) < self.max_pieces:
            self.cache[piece] = ids
        return ids

    def encode(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(texts)
        slow, lookup = [], self.cache.get
        for i, text in enumerate(texts):
            if self._fast(text):
                pieces = _ASCII_PIECES.findall(text)
                parts = list(map(lookup, pieces))
                if None in parts:
                    parts = [ids if ids is not None else self._piece(p) for p, ids in zip(pieces, parts)]
                out[i] = list(chain.from_iterable(parts))
            else:
                slow.append(i)
        if slow:
            for i, enc in zip(slow, self.tok.encode_batch([texts[i] for i in slow], add_special_tokens=False)):
                out[i] = enc.ids
        return out
