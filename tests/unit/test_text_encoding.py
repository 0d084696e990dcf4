"""Every text file gen_ad, its trainers, benches and scripts read or write names its encoding.

Without ``encoding=`` Python uses the locale's (cp1252 on most Windows machines): a manifest, a
CSV or a config with a non-ASCII path or a unit like µm then fails to read, or reads differently
on another machine. The same holds for a subprocess's output decoded as text.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("gen_ad", "train", "bench", "scripts")
_TEXT_CALLS = {"open", "read_text", "write_text"}
_SUBPROCESS = {"run", "Popen", "check_output", "check_call", "call"}
_OTHER_OPENERS = {"os", "Image", "tarfile", "zipfile", "zf", "tf", "gzip", "openslide", "slide"}


def _mode(call: ast.Call) -> str | None:
    """The constant mode of an ``open`` call (``open(p, mode)`` or ``p.open(mode)``)."""
    for k in call.keywords:
        if k.arg == "mode" and isinstance(k.value, ast.Constant):
            return str(k.value.value)
    at = 1 if isinstance(call.func, ast.Name) else 0
    if len(call.args) > at and isinstance(call.args[at], ast.Constant):
        return str(call.args[at].value)
    return None


def _unnamed_encoding(call: ast.Call) -> bool:
    """A text-mode file or subprocess call without ``encoding=``."""
    kws = {k.arg: k.value for k in call.keywords}
    if "encoding" in kws:
        return False
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
    if name in _SUBPROCESS and owner == "subprocess":
        flag = kws.get("text", kws.get("universal_newlines"))
        return isinstance(flag, ast.Constant) and flag.value is True
    if name not in _TEXT_CALLS or owner in _OTHER_OPENERS:
        return False
    if name != "open" and isinstance(f, ast.Name):  # gen_ad.utils.io.write_text: UTF-8 bytes
        return False
    mode = _mode(call) if name == "open" else None
    return mode is None or "b" not in mode


def _offences(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _unnamed_encoding(node):
            yield f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:90]}"


def test_every_text_file_and_subprocess_names_its_encoding() -> None:
    files = [p for d in SOURCES for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    found = [o for p in files for o in _offences(p)]
    assert not found, "text I/O without encoding= (locale-dependent):\n" + "\n".join(found)


@pytest.mark.parametrize(("code", "bad"), [
    ("open(p)", True), ("open(p, 'w')", True), ("open(p, 'rb')", False),
    ("open(p, mode='a', encoding='utf-8')", False), ("p.read_text()", True),
    ("p.write_text(s, encoding='utf-8')", False), ("p.open('a')", True), ("p.open('rb')", False),
    ("write_text(p, s)", False), ("os.open(p, 0)", False), ("Image.open(p)", False),
    ("subprocess.run(c, text=True)", True), ("subprocess.run(c, capture_output=True)", False),
    ("subprocess.run(c, text=True, encoding='utf-8')", False),
])
def test_the_check_itself(code: str, bad: bool) -> None:
    call = ast.parse(code).body[0].value  # type: ignore[attr-defined]
    assert _unnamed_encoding(call) is bad
