"""Word sequences and their longest common subsequence: how much of a reference text an extraction keeps, in order."""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercase runs of letters and digits (NFKC-folded, so ligatures and widths compare equal)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (bit-parallel, Allison-Dix / Hyyrö).

    One pass over ``b`` with Python integers as bit vectors over ``a``: O(len(b) * len(a) / 64)
    machine words, fast enough for documents of tens of thousands of words.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, word in enumerate(a):
        masks[word] = masks.get(word, 0) | (1 << i)
    row = 0
    for word in b:
        match = masks.get(word)
        if match is None:
            continue
        x = match | row
        y = (row << 1) | 1
        row = x & ~(x - y)  # keep the lowest set bit of each run: one more matched position per run
    return bin(row).count("1")
