"""The import graph of gen_ad: no circles, and the library never reaches up a layer.

Every module is parsed (imports inside functions included; ``if TYPE_CHECKING:`` blocks are not
imports at run time and are left out) and each ``gen_ad`` import is resolved to the module it
names. Layers, lowest first: a module may import its own layer or any layer below it; a module
belongs to the layer of its longest listed prefix.
"""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

PKG = Path(__file__).resolve().parents[2] / "gen_ad"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("gen_ad._version", "gen_ad.errors", "gen_ad.utils", "gen_ad.config",
     "gen_ad.weights.registry"),
    ("gen_ad.data",),
    ("gen_ad.models",),
    ("gen_ad.scoring",),
    ("gen_ad.report",),  # presentation primitives: figures, HTML, contact sheets
    ("gen_ad.metrics",),
    ("gen_ad.inversion",),
    ("gen_ad.baselines", "gen_ad.weights"),  # weights install/convert builds these networks
    ("gen_ad.training",),
    ("gen_ad.app",),  # the command layer
    ("gen_ad.cli", "gen_ad"),  # the entry point and the package facade (gen_ad.load_run)
)

#: The one import allowed to run up a layer, and why.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("gen_ad.data.stain_shift", "gen_ad.baselines.colour"):
        "the stain-shift re-evaluation takes its reference colour from the colour-only "
        "baseline's statistics (one definition of those statistics, imported lazily)",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, resolve: Callable[[str], str | None]) -> set[str]:
    """Modules a parsed module imports: ``from gen_ad.x import y`` names the module
    ``gen_ad.x.y`` when there is one, else ``gen_ad.x``."""
    found: set[str | None] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("gen_ad")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "gen_ad":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if resolve(full) == full else resolve(node.module))
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if m is not None}


def graph() -> dict[str, set[str]]:
    """``{module: gen_ad modules it imports}`` over the whole package."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    return {m: _imports(ast.parse(p.read_text(encoding="utf-8")), resolve) - {m}
            for m, p in mods.items()}


def layer(module: str) -> int:
    best = (-1, -1)
    for i, names in enumerate(LAYERS):
        for n in names:
            if module == n or module.startswith(n + "."):
                best = max(best, (len(n), i))
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_graph_sees_imports_inside_functions() -> None:
    edges = graph()
    assert "gen_ad.app.train" in edges["gen_ad.cli"]  # imported inside a handler
    assert "gen_ad.training.loop" in edges["gen_ad.app.train"]


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_library_never_imports_the_command_layer() -> None:
    top = layer("gen_ad.app")
    bad = [(m, t) for m, ts in graph().items() for t in ts
           if layer(m) < top and layer(t) >= top]
    assert bad == []


def test_at_most_one_upward_import() -> None:
    assert len(ALLOWED_UPWARD) <= 1
    up = sorted((m, t) for m, ts in graph().items() for t in ts if layer(t) > layer(m))
    assert [e for e in up if e not in ALLOWED_UPWARD] == [], "imports that run up a layer"


def test_the_cli_calls_the_command_layer_only() -> None:
    """``cli.py`` parses arguments and calls :mod:`gen_ad.app` (DESIGN: nothing else happens
    there): no import of the library below the command layer."""
    allowed = ("gen_ad.app", "gen_ad.errors", "gen_ad._version")
    below = sorted(m for m in graph()["gen_ad.cli"] if m.startswith("gen_ad.")
                   and not any(m == a or m.startswith(a + ".") for a in allowed))
    assert not below, f"gen_ad/cli.py imports {below}: reach them through gen_ad.app"


# ----------------------------------------------------------------------------- torch-free commands

#: Runs the commands that need no torch in one fresh interpreter, then names the torch modules it
#: holds (importing torch costs seconds before the first tile is cut).
TORCH_FREE_CHILD = """
import contextlib, io, json, sys
from gen_ad.cli import main
codes = []
for argv in (["tile", "--help"], ["configs"],
             ["tile", "--out", sys.argv[2], "--size", "32", "--workers", "1", sys.argv[1]]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as e:  # --help
            codes.append(e.code)
print(json.dumps({"codes": codes, "torch": sorted(m for m in sys.modules
                                                   if m.split(".")[0] == "torch")}))
"""


def test_tile_and_configs_never_import_torch(tmp_path: Path,
                                             checkout_env: Callable[..., dict[str, str]]) -> None:
    """``gen-ad tile`` (parse, tile a slide, write the manifest) and ``gen-ad configs`` load no
    torch: :mod:`gen_ad.data` re-exports its torch-backed names lazily and
    :mod:`gen_ad.utils.io` imports torch and safetensors inside the functions that use them."""
    rng = np.random.default_rng(0)
    slide = np.clip(rng.normal((210, 120, 175), 12, (96, 128, 3)), 0, 255).astype(np.uint8)
    slide[:, :32] = 246  # glass: a 3 x 4 grid of 32 px tiles, 9 of them tissue
    tifffile.imwrite(tmp_path / "slide.tif", slide, tile=(32, 32), photometric="rgb")
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_CHILD, str(tmp_path / "slide.tif"),
                           str(tmp_path / "tiles")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=checkout_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["codes"] == [0, 0, 0]
    with open(tmp_path / "tiles" / "manifest.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 9
    assert seen["torch"] == [], "a torch-free command imported torch"


def test_gen_ad_data_names_still_import() -> None:
    """The lazily re-exported names of :mod:`gen_ad.data` resolve to their definitions."""
    import gen_ad.data as data
    from gen_ad.data import folders

    for name in data._LAZY:
        assert getattr(data, name) is getattr(folders if name != "Dataset" else
                                              sys.modules["torch.utils.data"], name)
    assert set(data.__all__) <= set(dir(data))
    from gen_ad.data import cache  # a submodule, not a lazy name

    assert cache.__name__ == "gen_ad.data.cache"
