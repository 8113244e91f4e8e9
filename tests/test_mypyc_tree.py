"""``benchmarks/mypyc_tree.py``'s source rewrites of the copy it compiles.

The build itself needs a C compiler and three minutes; what it does to the sources before
compiling is checked here, by running the rewritten modules as Python: a class without its
``__slots__`` must still work as before (with an instance ``__dict__`` instead), a class
left interpreted must be the same class, its base and behaviour included, and every text
patch must still find its text in ``src/`` exactly once (a patch that no longer applies
stops the build, so this test sees it first).
"""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import mypyc_tree

MODULE = '''
import collections


class Pair:
    """Two values."""

    __slots__ = (
        "a",
        "b",
    )
    size: int = 2

    def __init__(self, a: int, b: int) -> None:
        self.a = a
        self.b = b


class Only:
    __slots__: tuple[str, ...] = ("x",)


@staticmethod
def helper() -> int:
    return 1


class Counted(collections.Counter):  # a base the type checker may see as Any
    def total_twice(self) -> int:
        return 2 * sum(self.values())
'''


def test_slots_are_dropped_and_the_classes_still_work(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(MODULE)
    mypyc_tree._drop_slots(path)
    text = path.read_text()
    tree = ast.parse(text)
    names = [
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    ]
    assert "__slots__" not in names
    ns = runpy.run_path(str(path))
    pair = ns["Pair"](1, 2)
    assert (pair.a, pair.b, pair.size) == (1, 2, 2)
    assert "__slots__" not in vars(ns["Pair"]) and "__slots__" not in vars(ns["Only"])
    pair.c = 3  # no slots: an instance dict, as a native class's layout needs no slots
    assert ns["Only"]() is not None


def test_a_class_left_interpreted_is_the_same_class(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(MODULE)
    mypyc_tree._interpret_class(path, "Counted")
    assert "class Counted" not in "".join(
        line for line in path.read_text().splitlines(True) if not line.startswith("exec(")
    )
    counted = runpy.run_path(str(path))["Counted"]
    import collections

    assert issubclass(counted, collections.Counter)
    c = counted("aab")
    assert len(c) == 2 and c.total_twice() == 6


def test_every_patch_finds_its_text_once_in_src() -> None:
    for module, (old, _new) in mypyc_tree.PATCHES:
        text = (ROOT / "src" / "pyserval" / module).read_text()
        assert text.count(old) == 1, module
    for module, name in mypyc_tree.INTERPRETED_CLASSES:
        tree = ast.parse((ROOT / "src" / "pyserval" / module).read_text())
        assert [c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == name], name
