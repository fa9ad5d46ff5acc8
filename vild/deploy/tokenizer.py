"""CLIP's byte-pair-encoding tokenizer without torch: numpy token arrays, the same ids as open_clip's.

A port of the encoding half of ``open_clip.tokenizer.SimpleTokenizer`` (from OpenAI's CLIP, MIT licence,
Copyright (c) 2021 OpenAI), whose module imports torch. The merges come from the exported text tower's
metadata, so a deployment needs no open_clip install; ``ftfy`` and ``regex`` are the only dependencies.
"""
from __future__ import annotations

import html
from functools import lru_cache

import numpy as np

# open_clip uses the first 49152 - 256 - 2 merges of its BPE file: with the 512 byte tokens (plain and
# word-final) and the start and end tokens, a 49408-token vocabulary
NUM_MERGES = 49152 - 256 - 2


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map of the 256 byte values to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class BPETokenizer:
    """``SimpleTokenizer(context_length=...)`` (clean="lower") from its merge list: ``tok(texts)`` → int64 [N, L]."""

    def __init__(self, merges: list[str], context_length: int):
        import regex

        pairs = [tuple(m.split()) for m in merges[:NUM_MERGES]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
        special = ["<start_of_text>", "<end_of_text>"]
        vocab.extend(special)
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.bpe_ranks = {p: i for i, p in enumerate(pairs)}
        self.cache = {t: t for t in special}
        self.pat = regex.compile("|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.sot_token_id, self.eot_token_id = self.encoder[special[0]], self.encoder[special[1]]
        self.context_length = int(context_length)

    def bpe(self, token: str) -> str:
        """The space-separated BPE pieces of one pre-token."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            first, second = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if (first, second) not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start and end tokens."""
        import ftfy

        text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower()
        byte_encoder = bytes_to_unicode()
        ids: list[int] = []
        for token in self.pat.findall(text):
            token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int64 [N, context_length]: start token, text, end token, zeros; cut texts end with the end token."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot_token_id
            out[i, :len(ids)] = ids
        return out
