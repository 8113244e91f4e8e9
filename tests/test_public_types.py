"""No ``Any`` crosses the public surface: every name in ``pyserval.__all__`` is fully typed.

For each public function, and each public method and property that a public class defines
in pyserval's own code (what it inherits from anyio or asyncio is theirs), the annotations
are resolved with ``typing.get_type_hints`` (every ``@overload`` too) and searched for
``typing.Any``, however deeply nested (``dict[str, Any]``, ``Callable[..., Any]``). A
missing annotation counts as ``Any``, as mypy reads it.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pyserval

# Names whose signatures are not ours to type: the module attribute, and data.
SKIP = {"__version__"}


def _contains_any(hint: object) -> bool:
    if hint is Any:
        return True
    return any(_contains_any(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)


def _callables(name: str, obj: object) -> Iterator[tuple[str, Callable[..., object]]]:
    """``(qualified name, function)`` for the public callables ``obj`` defines."""
    if inspect.isclass(obj):
        for attr, value in vars(obj).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            if isinstance(value, property):
                for part, fn in (("", value.fget), (".setter", value.fset)):
                    if fn is not None:
                        yield f"{name}.{attr}{part}", fn
            elif isinstance(value, staticmethod | classmethod):
                yield f"{name}.{attr}", value.__func__
            elif inspect.isfunction(value):
                yield f"{name}.{attr}", value
    elif inspect.isfunction(obj):
        yield name, obj


def _hints(fn: Callable[..., object]) -> dict[str, Any]:
    """``fn``'s resolved annotations. A name imported only under ``TYPE_CHECKING`` is not in
    its module at run time: it is looked up in the loaded modules (pyserval's first)."""
    extra: dict[str, object] = {}
    for _ in range(20):
        try:
            return typing.get_type_hints(fn, localns=extra)
        except NameError as exc:
            missing = exc.name
            modules = sorted(sys.modules.items(), key=lambda m: not m[0].startswith("pyserval"))
            for _mod_name, module in modules:
                if module is not None and missing in vars(module):
                    extra[missing] = vars(module)[missing]
                    break
            else:
                raise
    raise AssertionError(f"cannot resolve the annotations of {fn.__qualname__}")


def _untyped(fn: Callable[..., object]) -> list[str]:
    """What in ``fn``'s signature (each of its overloads) is ``Any`` or not annotated."""
    problems: list[str] = []
    for variant in typing.get_overloads(fn) or [fn]:
        hints = _hints(variant)
        params = inspect.signature(variant).parameters
        for pname in params:
            if pname in ("self", "cls"):
                continue
            if pname not in hints:
                problems.append(f"{pname} (no annotation)")
            elif _contains_any(hints[pname]):
                problems.append(f"{pname}: {hints[pname]}")
        ret = hints.get("return", Any) if variant.__name__ != "__init__" else None
        if ret is not None and _contains_any(ret):
            problems.append(f"return: {hints.get('return', '(no annotation)')}")
    return problems


def _public_callables() -> list[tuple[str, Callable[..., object]]]:
    found: list[tuple[str, Callable[..., object]]] = []
    for name in pyserval.__all__:
        if name in SKIP:
            continue
        obj = getattr(pyserval, name)
        found.extend(
            (qual, fn)
            for qual, fn in _callables(name, obj)
            if getattr(fn, "__module__", "").startswith("pyserval")
        )
    return found


def test_no_public_signature_has_any() -> None:
    offenders = {qual: p for qual, fn in _public_callables() if (p := _untyped(fn))}
    assert offenders == {}


def test_the_check_sees_the_host_api_and_its_overloads() -> None:
    # Guards the check itself: Host.connect is seen, with a concrete return per overload.
    found = dict(_public_callables())
    connect = found["Host.connect"]
    returns = {typing.get_type_hints(v)["return"] for v in typing.get_overloads(connect)}
    assert pyserval.ServalStream in returns and pyserval.SecureStream in returns
    assert typing.get_type_hints(found["Host.socket"])["return"] is pyserval.ServalSocket


def test_the_check_flags_any() -> None:
    def loose(x: int, y: dict[str, Any]) -> list[Any]:
        return []

    def bare(x, y: int) -> int:  # type: ignore[no-untyped-def]
        return y

    assert _untyped(loose) == ["y: dict[str, typing.Any]", "return: list[typing.Any]"]
    assert _untyped(bare) == ["x (no annotation)"]
