"""One registry of the pure models' memo caches (planner pieces, schedule profiles), so that
`clear_caches` empties every one of them: for cold-start timings, and for tests that patch a
constant. Nothing here imports another modelpar module."""

from __future__ import annotations

import functools
from collections.abc import Callable

_REGISTERED: list = []


def memo(maxsize: int) -> Callable:
    """`functools.lru_cache(maxsize)`, registered for `clear_caches`."""

    def decorate(function: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(function)
        _REGISTERED.append(cached)
        return cached

    return decorate


def clear_caches() -> None:
    """Empty every registered cache."""
    for cached in _REGISTERED:
        cached.cache_clear()
