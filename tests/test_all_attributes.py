"""The public namespace: ``bgsave.__all__`` is the whole API, and every name in it exists (as in anyio's test)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import bgsave


def test_all_is_a_sorted_tuple_of_unique_strings() -> None:
    """``__all__`` is a tuple of unique strings, kept sorted."""
    assert isinstance(bgsave.__all__, tuple)
    assert all(isinstance(name, str) for name in bgsave.__all__)
    assert list(bgsave.__all__) == sorted(set(bgsave.__all__))


@pytest.mark.parametrize("name", bgsave.__all__)
def test_every_exported_name_exists(name: str) -> None:
    """Each name in ``__all__`` is an attribute of the package, defined inside bgsave."""
    obj = getattr(bgsave, name)
    assert getattr(obj, "__module__", "").startswith("bgsave")


def test_star_import_gives_exactly_all() -> None:
    """``from bgsave import *`` binds exactly the names in ``__all__``."""
    namespace: dict[str, object] = {}
    exec("from bgsave import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(bgsave.__all__)


def test_public_classes_and_functions_of_the_package_are_all_exported() -> None:
    """Every public class or function the package namespace holds from bgsave's modules is listed in ``__all__``."""
    missing = [
        name
        for name, obj in vars(bgsave).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "").startswith("bgsave")
        and name not in bgsave.__all__
    ]
    assert missing == []


@pytest.mark.parametrize(
    "module_name",
    sorted(info.name for info in pkgutil.iter_modules(bgsave.__path__, "bgsave.") if info.name != "bgsave.__main__"),
)
def test_each_module_all_names_exist(module_name: str) -> None:
    """Every module declares a tuple ``__all__`` whose names all exist in it."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional integration whose extra is not installed
        pytest.skip(f"{module_name}: {exc}")
    names = getattr(module, "__all__", None)
    assert isinstance(names, tuple), f"{module_name}.__all__ must be a tuple"
    for name in names:
        assert hasattr(module, name), f"{module_name}.{name}"


def test_every_exported_exception_derives_from_bgsave_error() -> None:
    """The exception tree has one root: every exported exception class is a BgsaveError."""
    exceptions = [
        getattr(bgsave, n)
        for n in bgsave.__all__
        if inspect.isclass(getattr(bgsave, n)) and issubclass(getattr(bgsave, n), BaseException)
    ]
    assert exceptions
    for exc in exceptions:
        assert issubclass(exc, bgsave.BgsaveError), exc
        assert issubclass(exc, Exception), exc  # never a bare BaseException (DCP's mistake)
