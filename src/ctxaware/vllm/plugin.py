"""vLLM general plugin entry point (filled in below)."""
from __future__ import annotations


def register() -> None:
    return None
