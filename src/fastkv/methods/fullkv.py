"""FullKV: the uncompressed baseline. Every layer sees every token and caches every entry."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass(kw_only=True)
class FullKV(Method):
    """No compression: the reference that every other method is measured against."""

    name = "fullkv"
    reduces = "nothing"
