"""Counts in messages, said properly: "1 shard", "2 shards", "1 empty, 2 not-an-image"."""

from __future__ import annotations

from collections.abc import Mapping


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``"1 shard"``, ``"2 shards"``, ``"1,024 samples"`` (``nouns``: an irregular plural)."""
    return f"{n:,} {noun if n == 1 else nouns or noun + 's'}"


def tally(counts: Mapping[str, int], empty: str = "none") -> str:
    """``{"empty": 1, "not-an-image": 2}`` -> ``"1 empty, 2 not-an-image"`` (sorted by name)."""
    return ", ".join(f"{v:,} {k}" for k, v in sorted(counts.items())) or empty
