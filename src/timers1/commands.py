"""Core subcommands (params, convert); other capability modules register their own."""

from __future__ import annotations


def register(sub) -> None:
    pass
