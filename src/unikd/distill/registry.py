"""The method registry: ``METHODS[name]`` is the :class:`~unikd.distill.base.Distiller` for
``distill.method = name``. A new method is one file with ``@register_method("name")`` on its class."""
from __future__ import annotations

from unikd.registry import make_register

METHODS: dict[str, type] = {}
register_method = make_register(METHODS, "distillation method", "method")
"""Class decorator: register a distiller class under ``name`` and set its ``method``."""
