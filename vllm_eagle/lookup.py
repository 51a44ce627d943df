"""Draft stage, free half: prompt lookup. Where the context repeats itself (code, lists, a greedy answer that
loops), the tokens that followed the last earlier occurrence of the context's tail are a draft that costs no head
forward; the head drafts the other rows. Verification is the same for both (drafts are point-mass proposals), so
output stays exactly the target's.

E.g. context [5, 9, 2, 7, 1, 9, 2], K = 2: the tail (9, 2) last occurred at 1..2, followed by [7, 1] -> draft [7, 1].
"""
from __future__ import annotations

import numpy as np

LOOKUP_NGRAM = (2, 4)        # tail lengths tried, longest first (vLLM's ngram method: prompt_lookup_min / max)


def lookup_draft(tokens: np.ndarray, k: int, min_n: int = LOOKUP_NGRAM[0], max_n: int = LOOKUP_NGRAM[1]) -> list[int]:
    """tokens [T] int: the request's committed tokens (prompt + output) -> the k tokens that followed the most recent
    earlier occurrence of its last n tokens, for the longest n in max_n..min_n that has one with k tokens after it;
    [] if none. An occurrence must end at least k tokens before the end, so its continuation is all context."""
    T = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if T - k < n:                             # an occurrence starts at s <= T - n - k: its k followers are context
            continue
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: T - k], n)    # [T - k - n + 1, n]
        hits = np.flatnonzero((windows == tokens[T - n:]).all(axis=1))
        if len(hits):
            i = int(hits[-1]) + n
            return tokens[i: i + k].tolist()
    return []
