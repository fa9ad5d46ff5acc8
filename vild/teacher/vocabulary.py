"""Vocabularies: lists of categories, each a list of synonyms (the first is the display name)."""
from __future__ import annotations

import os
import re
import warnings
from typing import Sequence, Union

VocabLike = Union[str, Sequence[Union[str, Sequence[str]]]]

EMPTY_MESSAGE = 'vocabulary is empty: pass --vocab "cat,dog"'


def _synonyms(item: Union[str, Sequence[str]]) -> list[str]:
    """One category -> its stripped, non-blank synonyms ("a|b" or ["a", "b"])."""
    parts = item.split("|") if isinstance(item, str) else [p for s in item for p in str(s).split("|")]
    out: list[str] = []
    for p in (p.strip() for p in parts):
        if p and p not in out:
            out.append(p)
    return out


def parse_vocabulary(text_or_list: VocabLike, dedupe: bool = True) -> list[list[str]]:
    """Parse "couch|sofa,tv", a list of "a|b" strings, or a list of synonym lists."""
    items = text_or_list.split(",") if isinstance(text_or_list, str) else list(text_or_list)
    vocab = [s for s in (_synonyms(i) for i in items) if s]
    if not vocab:
        raise ValueError(EMPTY_MESSAGE)
    if not dedupe:
        return vocab
    seen: set[str] = set()
    unique = []
    for syns in vocab:
        if syns[0] in seen:
            warnings.warn(f"duplicate category {syns[0]!r} in vocabulary: keeping the first", stacklevel=2)
            continue
        seen.add(syns[0])
        unique.append(syns)
    return unique


def load_vocabulary_file(path: Union[str, os.PathLike]) -> list[list[str]]:
    """Read one category per line ("couch|sofa"); "#" starts a comment."""
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is not part of a name
        lines = [line.split("#", 1)[0] for line in f]
    return parse_vocabulary([line for line in lines if line.strip()])


def clean_name(name: str) -> str:
    """Readable prompt text for LVIS-style names: "bow_(weapon)" -> "bow weapon".

    Underscores become spaces, parentheses are dropped, "/" becomes " or " (Objects365
    style, as in the ViLD release); ordinary names pass through unchanged.
    """
    name = name.replace("_", " ").replace("/", " or ")
    name = re.sub(r"[()]", " ", name)
    return " ".join(name.split())


def name_key(name: str) -> str:
    """The form under which two names are the same category: cleaned and lower-cased ("Teddy_bear" = "teddy bear")."""
    return clean_name(name).lower()


def dedupe_case_insensitive(vocab: list[list[str]]) -> list[list[str]]:
    """Drop categories whose first name repeats an earlier one's up to case ("Cat" and "cat" embed the same),
    keeping the first, with a warning (``parse_vocabulary`` removes exact repeats only)."""
    seen: set[str] = set()
    out = []
    for syns in vocab:
        if name_key(syns[0]) in seen:
            warnings.warn(f"duplicate category {syns[0]!r} in vocabulary: keeping the first", stacklevel=3)
            continue
        seen.add(name_key(syns[0]))
        out.append(syns)
    return out
