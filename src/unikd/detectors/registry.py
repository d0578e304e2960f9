"""The family registry: ``FAMILIES[name]`` is the adapter class for ``model.family = name``."""
from __future__ import annotations

from typing import Callable

FAMILIES: dict[str, type] = {}


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: register an adapter class under ``name`` and set its ``family``."""

    def register(cls: type) -> type:
        if name in FAMILIES:
            raise ValueError(f"detector family '{name}' is already registered by {FAMILIES[name].__name__}")
        cls.family = name
        FAMILIES[name] = cls
        return cls

    return register
