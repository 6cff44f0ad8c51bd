"""ROUGE-L between prompts, and an index that finds near-duplicates among many quickly.

ROUGE-L is the F-measure of the longest common subsequence over lowercase word tokens,
``F = 2 LCS / (m + n)`` for token counts ``m, n`` (the balanced F of Lin 2004). The LCS
is computed with a bit-parallel algorithm (Hyyro 2004), and most comparisons are skipped
with an exact upper bound from bag-of-words overlap (``LCS <= sum_w min(c_a(w), c_b(w))``)
computed for all prompts at once through an inverted index.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["lcs_length", "rouge_l", "rouge_tokens"]


_WORD = re.compile(r"\w+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercase word tokens (Unicode ``\\w+`` runs), as ROUGE tokenises for ROUGE-L."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (bit-parallel, Hyyro 2004).

    Bit ``i`` of ``v`` is 1 while row ``i`` of the DP has not yet gained a match; for each
    symbol of ``b``: ``u = v & match[sym]; v = (v + u) | (v - u)``. The LCS is the number
    of zero bits among the low ``len(a)`` bits of ``v``.
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[Any, int] = {}
    for i, sym in enumerate(a):
        masks[sym] = masks.get(sym, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for sym in b:
        u = v & masks.get(sym, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-L F-measure ``2 LCS / (m + n)`` between two texts (or token lists)."""
    ta = rouge_tokens(a) if isinstance(a, str) else list(a)
    tb = rouge_tokens(b) if isinstance(b, str) else list(b)
    if not ta or not tb:
        return 0.0
    return 2.0 * lcs_length(ta, tb) / (len(ta) + len(tb))


class _Index:
    """Growable inverted index: word id -> (doc ids, counts) for bag-overlap bounds."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.postings: list[list[Any]] = []  # [ids array, counts array, size]
        self.docs: list[list[int]] = []
        self.lengths = np.zeros(16, dtype=np.int64)

    def encode(self, tokens: Sequence[str], grow: bool) -> list[int]:
        out = []
        for t in tokens:
            j = self.vocab.get(t)
            if j is None:
                if not grow:
                    j = -1
                else:
                    j = self.vocab[t] = len(self.vocab)
                    self.postings.append([np.zeros(4, np.int64), np.zeros(4, np.int32), 0])
            out.append(j)
        return out

    def add(self, tokens: Sequence[str]) -> None:
        ids = self.encode(tokens, grow=True)
        doc = len(self.docs)
        self.docs.append(ids)
        if doc >= len(self.lengths):
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
        self.lengths[doc] = len(ids)
        for w, c in Counter(ids).items():
            post = self.postings[w]
            if post[2] == len(post[0]):
                post[0] = np.concatenate([post[0], np.zeros_like(post[0])])
                post[1] = np.concatenate([post[1], np.zeros_like(post[1])])
            post[0][post[2]] = doc
            post[1][post[2]] = c
            post[2] += 1

    def max_rouge_exceeds(self, tokens: Sequence[str], threshold: float) -> bool:
        """Whether some indexed document has ROUGE-L > ``threshold`` with ``tokens``."""
        n = len(self.docs)
        if n == 0 or not tokens:
            return False
        ids = self.encode(tokens, grow=False)
        overlap = np.zeros(n, dtype=np.int64)
        for w, c in Counter(ids).items():
            if w < 0:
                continue
            doc_ids, counts, size = self.postings[w]
            overlap[doc_ids[:size]] += np.minimum(counts[:size], c)
        bound = 2.0 * overlap / (len(ids) + self.lengths[:n])
        (cands,) = np.nonzero(bound > threshold)
        if cands.size == 0:
            return False
        m = len(ids)
        for d in cands[np.argsort(-bound[cands], kind="stable")]:
            doc = self.docs[int(d)]
            if 2.0 * lcs_length(ids, doc) / (m + len(doc)) > threshold:
                return True
        return False
