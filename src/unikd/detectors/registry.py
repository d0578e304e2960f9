"""The family registry: ``FAMILIES[name]`` is the adapter class for ``model.family = name``."""
from __future__ import annotations

from unikd.registry import make_register

FAMILIES: dict[str, type] = {}
register_family = make_register(FAMILIES, "detector family", "family")
"""Class decorator: register an adapter class under ``name`` and set its ``family``."""
