"""Registries (methods, experts, ...): name -> entry, built once; a name registered twice is an error."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def registry(entries: Iterable[T], what: str) -> dict[str, T]:
    """`entries` (each with a .name) by name, in order; refuses duplicates (a silent overwrite would
    keep only the last of two same-named entries)."""
    out: dict[str, T] = {}
    for e in entries:
        name = getattr(e, "name")
        if name in out:
            raise ValueError(f"{what} {name!r} registered twice")
        out[name] = e
    return out
