"""Keep every entry: the cache of an uncompressed model (FullKV), or of the tokens a reducer let through."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import CachePolicy


@dataclass(frozen=True, kw_only=True)
class KeepAll(CachePolicy):
    """Every layer caches every token present at it."""

    name = "all"
