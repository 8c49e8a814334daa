"""The registry: a plugin class registers under its own ``name``, written once, by a line or a decorator."""

from __future__ import annotations

from typing import ClassVar

import pytest

from miprun import estimators, methods, repair
from miprun.capture import statistics
from miprun.errors import UnknownNameError
from miprun.registry import Registry

PLUGIN_REGISTRIES = [statistics.REGISTRY, estimators.REGISTRY, methods.REGISTRY, repair.REGISTRY]


@pytest.mark.parametrize("registry", PLUGIN_REGISTRIES, ids=lambda r: r.kind)
def test_every_plugin_is_registered_under_its_own_name(registry: Registry) -> None:
    assert len(registry) > 0
    assert all(cls.name == name for name, cls in registry.items()), registry.items()


def test_register_takes_the_name_from_the_class_as_a_line_or_a_decorator() -> None:
    registry: Registry[type] = Registry("widget")

    class Plain:
        name: ClassVar[str] = "plain"

    assert registry.register(Plain) is Plain

    @registry.register
    class Decorated:
        name: ClassVar[str] = "decorated"

    assert registry.names() == ["plain", "decorated"] and registry["decorated"] is Decorated
    with pytest.raises(ValueError, match="widget 'plain' is registered twice"):
        registry.register(Plain)
    with pytest.raises(UnknownNameError, match="Did you mean 'plain'"):
        registry.get("plan")


def test_a_class_without_a_name_is_refused() -> None:
    registry: Registry[type] = Registry("widget")

    class Nameless:
        pass

    with pytest.raises(TypeError, match="no `name` string"):
        registry.register(Nameless)
    assert len(registry) == 0


@pytest.mark.parametrize(
    "package", ["miprun.methods", "miprun.repair", "miprun.estimators", "miprun.capture.statistics"]
)
def test_every_module_of_a_plugin_package_is_imported_so_a_new_plugin_file_needs_no_import_line(package):
    import importlib
    import pkgutil
    import sys

    pkg = importlib.import_module(package)
    modules = [
        m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg and not m.name.startswith("_")
    ]
    assert modules and all(f"{package}.{name}" in sys.modules for name in modules)
