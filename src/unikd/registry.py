"""Name → class tables filled by class decorators: the detector families and the distillation methods."""
from __future__ import annotations

from typing import Callable


def make_register(table: dict[str, type], kind: str, attribute: str) -> Callable[[str], Callable[[type], type]]:
    """A decorator factory: ``@register(name)`` puts the class in ``table`` under ``name`` and sets its
    ``attribute`` to ``name``; a second class under one name is an error naming ``kind``."""

    def register(name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in table:
                raise ValueError(f"{kind} '{name}' is already registered by {table[name].__name__}")
            setattr(cls, attribute, name)
            table[name] = cls
            return cls

        return add

    return register
