"""Attributes of a package imported on first use (PEP 562), so that importing the package itself stays light."""

import importlib
import sys


def lazy_attributes(package: str, sources: dict[str, str]):
    """`__getattr__` and `__dir__` for the package `package`: attribute `name` comes from the module `sources[name]`
    (relative to the package) when first asked for."""

    def __getattr__(name: str):
        if name in sources:
            return getattr(importlib.import_module(sources[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted([*vars(sys.modules[package]), *sources])

    return __getattr__, __dir__
