import random

import pytest

from data_prep.synth import synth_documents
from data_prep.tokenizer import EOS, PieceCachedEncoder, ensure_special_tokens, train_bpe

# Alphabets the fuzzer draws runs from: the ASCII classes the cached path's regex spells out, and non-ASCII
# text that must fall back to the tokenizer (emoji with ZWJ and skin tone, combining marks, CJK, Unicode spaces).
ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " \t\n\r\x0b\x0c",
    "".join(map(chr, [*range(0, 9), *range(14, 32), 127])),  # controls that are not whitespace
    "\U0001f600\U0001f44d\U0001f3fd\u200d\U0001f469\U0001f4bb\u2764\ufe0f",
    "e\u0301a\u0308n\u0303\u0327\u20dd",
    "\u4e2d\u6587\u65e5\u672c\u8a9e\ud55c\uad6d\uc5b4\u3002",
    "\u00a0\u2028\u3000\u0085\u00e9\u00df",
]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'"]


def random_text(rng: random.Random, ascii_only: bool) -> str:
    alphabets = ALPHABETS[:5] if ascii_only else ALPHABETS
    parts = []
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.1:
            parts.append(rng.choice(CONTRACTIONS))
        elif r < 0.2:
            parts.append(rng.choice([" ", "\n", "\t", " \n"]) * rng.randint(2, 6))  # whitespace runs
        elif r < 0.25:
            parts.append(EOS)  # added-token text must not be split into pieces
        else:
            parts.append("".join(rng.choices(rng.choice(alphabets), k=rng.randint(1, 6))))
    return "".join(parts)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(1)
    corpus = [*synth_documents(200, seed=0), *(random_text(rng, ascii_only=False) for _ in range(200))]
    tok = train_bpe(corpus, 600)
    ensure_special_tokens(tok)
    return tok


def test_piece_cache_encodes_exactly_like_the_tokenizer_on_random_text(tokenizer):
    rng = random.Random(0)
    texts = [random_text(rng, ascii_only=i % 2 == 0) for i in range(600)]
    texts += ["", " ", "\n\n", "a  b", "a \n b", "  lead", "trail  ", "x'sy", "don't", "1,000.5", "\x1c\x1d a"]
    expected = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    encoder = PieceCachedEncoder(tokenizer)
    assert encoder.cached  # the fast path is under test, not only the fallback
    for batch in range(0, len(texts), 50):  # mixed batches: cached and fallback texts keep their order
        assert encoder.encode(texts[batch:batch + 50]) == expected[batch:batch + 50]
    assert encoder.encode(texts) == expected  # again from a warm cache
    assert len(encoder.cache) > 100
