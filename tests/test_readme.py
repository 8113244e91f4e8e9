"""The README works as written (issue 16): its asyncio snippet runs as pasted, and its
shell commands name the ``pyserval`` of the ``.venv`` so they work in a fresh shell."""

from __future__ import annotations

import re
import subprocess
import sys

from .helpers.processes import ROOT, child_env

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[tuple[str, str]]:
    """(section title, code) of each fenced block in ``language``."""
    out = []
    section = ""
    for part in re.split(r"(^## .*$)", README, flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        for code in re.findall(rf"^```{language}\n(.*?)^```", part, flags=re.M | re.S):
            out.append((section, code))
    return out


def test_the_asyncio_snippet_runs_as_pasted() -> None:
    (code,) = [c for s, c in _blocks("python") if s == "Using it from asyncio"]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "b'hello'\n"


def test_shell_commands_name_the_venv_program() -> None:
    for section, code in _blocks("sh"):
        for line in code.splitlines():
            words = line.split()
            assert not words or words[0] != "pyserval", f"{section}: {line!r}"
            assert "python " not in f"{line} " or ".venv/bin/python" in line or "python3 " in line
