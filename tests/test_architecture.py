"""The project's layers import one way (ARCHITECTURE.md), read from the import statements themselves.

    isfe_model  -> nothing of the project (and never torch: the wheel ships without it)
    training    -> isfe_model
    export      -> training, isfe_model
    serving     -> isfe_model
    demo        -> isfe_model
    benchmarks, tests -> anything

Every ``import`` / ``from ... import`` statement of every module is read with
``ast`` -- at module level, inside functions and classes, under ``if
TYPE_CHECKING``, relative (``from . import x``, ``from ..a import b``) -- plus
``importlib.import_module("...")`` / ``__import__("...")`` calls with a literal
name.  No module is imported, so a forbidden import that only runs on some
code path is still caught.  Modules of one package must not import each other
in a cycle either (also through function-level imports: a cycle broken by
hiding an import in a function is still two modules that each need the other).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer -> the project packages it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "isfe_model": frozenset(),
    "training": frozenset({"isfe_model"}),
    "export": frozenset({"training", "isfe_model"}),
    "serving": frozenset({"isfe_model"}),
    "demo": frozenset({"isfe_model"}),
}
PROJECT = frozenset(ALLOWED) | {"benchmarks", "tests"}
#: what isfe_model may import besides the standard library: its pyproject dependencies (numpy, pillow,
#: onnxruntime) anywhere ...
ISFE_MODEL_REQUIRES = frozenset({"numpy", "PIL", "onnxruntime"})
#: ... and optional backends only inside a function or a ``try: ... except ImportError``, so that
#: `import isfe_model` works without them
#: (faiss: the "faiss" extra, FAISS search; huggingface_hub: ``hf:ORG/REPO`` model packages)
ISFE_MODEL_OPTIONAL = frozenset({"faiss", "huggingface_hub"})


@dataclass(frozen=True)
class Import:
    """One import statement: ``importer`` (dotted module) at ``path:line`` imports the module ``target``."""

    importer: str
    path: str
    line: int
    target: str
    text: str
    in_function: bool
    guarded: bool = False  # inside ``try:`` with an ``except ImportError`` (or a broader) handler

    def where(self) -> str:
        place = " (inside a function)" if self.in_function else ""
        return f"{self.path}:{self.line}: `{self.text}`{place}"


def module_name(root: Path, path: Path) -> str:
    """``root/training/model.py`` -> "training.model"; ``root/training/__init__.py`` -> "training"."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level - 1 >= len(base):
        raise ValueError(f"relative import beyond the top-level package in {importer}")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _function_nodes(tree: ast.AST) -> set[int]:
    """ids of every node that lies inside a function body."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def _guarded_nodes(tree: ast.AST) -> set[int]:
    """ids of every node in the body of a ``try`` that handles ImportError (or ModuleNotFoundError / Exception)."""
    catches = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(isinstance(n, ast.Name) and n.id in catches for n in ast.walk(h.type))
                for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return guarded


def _literal_dynamic_import(node: ast.AST) -> str | None:
    """The literal name of ``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")``."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return None
    fn = node.func
    name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
    return node.args[0].value if name in ("import_module", "__import__") else None


def imports_of(root: Path, path: Path, modules: set[str]) -> list[Import]:
    """Every import in ``path``, resolved to the module imported (``from a import b`` -> "a.b" if that is a module)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    importer = module_name(root, path)
    rel = path.relative_to(root).as_posix()
    in_fn, guarded = _function_nodes(tree), _guarded_nodes(tree)
    found: list[Import] = []

    def add(node: ast.AST, target: str) -> None:
        text = (ast.get_source_segment(source, node) or "").split("\n")[0]
        found.append(Import(importer, rel, node.lineno, target, text, id(node) in in_fn, id(node) in guarded))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(importer, path.name == "__init__.py", node.level, node.module)
            subs = (f"{base}.{alias.name}" if base else alias.name for alias in node.names)
            for target in dict.fromkeys(sub if sub in modules else base for sub in subs):  # once per module
                add(node, target)
        elif (name := _literal_dynamic_import(node)) is not None:
            add(node, name)
    return sorted(found, key=lambda imp: imp.line)


def scan(root: Path, packages=tuple(ALLOWED)) -> tuple[list[Import], set[str]]:
    """All imports of every module under ``root/<package>/`` and the set of module names seen."""
    files = sorted(p for pkg in packages for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(root, p) for p in files}
    return [imp for p in files for imp in imports_of(root, p, modules)], modules


def layer_violations(imports: list[Import]) -> list[str]:
    """One message per import of a project package that the importer's layer may not use."""
    out = []
    for imp in imports:
        layer, top = imp.importer.split(".")[0], imp.target.split(".")[0]
        if layer in ALLOWED and top in PROJECT and top != layer and top not in ALLOWED[layer]:
            may = ", ".join(sorted(ALLOWED[layer])) or "nothing"
            out.append(f"{imp.where()}: {layer} imports {top}, but {layer} may import only {may} of the project "
                       f"(ARCHITECTURE.md); move what it needs into a layer {layer} may import, or move the caller "
                       f"into tests/ or benchmarks/")
    return out


def isfe_model_dependency_violations(imports: list[Import]) -> list[str]:
    """isfe_model imports the standard library, numpy, PIL, onnxruntime, and optional backends only lazily."""
    out = []
    for imp in imports:
        top = imp.target.split(".")[0]
        if imp.importer.split(".")[0] != "isfe_model" or top in PROJECT or top in sys.stdlib_module_names:
            continue
        if top in ISFE_MODEL_OPTIONAL and not (imp.in_function or imp.guarded):
            out.append(f"{imp.where()}: isfe_model imports the optional {top} at module level, so "
                       f"`import isfe_model` would fail without it; import it inside the function that needs it "
                       f"(or under try/except ImportError)")
        elif top not in ISFE_MODEL_REQUIRES | ISFE_MODEL_OPTIONAL:
            out.append(f"{imp.where()}: isfe_model imports {top}, but the pip package depends only on "
                       f"{', '.join(sorted(ISFE_MODEL_REQUIRES))} (optional: {', '.join(sorted(ISFE_MODEL_OPTIONAL))}; "
                       f"never torch); do that work in training/ or export/ and hand isfe_model arrays or files, "
                       f"or declare the dependency in pyproject.toml and here")
    return out


def import_cycles(imports: list[Import], modules: set[str]) -> list[list[str]]:
    """Groups (sorted) of two or more modules that reach each other through imports (strongly connected)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        reach[start] = seen
    groups = {frozenset({a} | {b for b in reach[a] if a in reach[b]}) for a in graph if a in reach[a]}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def _cycle_message(group: list[str], imports: list[Import]) -> str:
    members = set(group)
    edges = dict.fromkeys(imp.where() for imp in imports if imp.importer in members and imp.target in members
                          and imp.target != imp.importer)
    return (f"import cycle between {', '.join(group)}:\n    " + "\n    ".join(edges)
            + "\n  move what both need into a third module that imports neither")


# --------------------------------------------------------------------------- the checks on this checkout


@pytest.fixture(scope="module")
def project():
    return scan(ROOT)


def test_every_layer_is_scanned(project):
    imports, modules = project
    for layer in ALLOWED:
        assert any(m.split(".")[0] == layer for m in modules), f"no modules found under {layer}/"
    assert len(modules) >= 30 and len(imports) >= 200, (len(modules), len(imports))


def test_layers_import_one_way(project):
    imports, _ = project
    bad = layer_violations(imports)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_isfe_model_never_imports_torch_or_other_heavy_packages(project):
    imports, _ = project
    bad = isfe_model_dependency_violations(imports)
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules(project):
    imports, modules = project
    cycles = import_cycles(imports, modules)
    assert not cycles, "\n".join(_cycle_message(g, imports) for g in cycles)


# --------------------------------------------------------------------------- the checker itself (slow twin)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_finds_every_kind_of_forbidden_import(tmp_path):
    root = _tree(tmp_path, {
        "isfe_model/__init__.py": "from .a import f\n",
        "isfe_model/a.py": "import numpy as np\nfrom . import b\n\ndef f():\n    import torch\n    return torch\n",
        "isfe_model/b.py": "from .a import f  # cycle a <-> b\nfrom isfe_model import c\n",
        "isfe_model/c.py": "import os, json\nfrom PIL import Image\nimport faiss\n\n\ndef g():\n    import faiss\n\n\n"
                           "try:\n    import huggingface_hub\nexcept ImportError:\n    huggingface_hub = None\n",
        "training/__init__.py": "",
        "training/model.py": "from isfe_model.c import Image\nimport importlib\n"
                             "importlib.import_module('serving.app')\n",
        "export/__init__.py": "",
        "export/cli.py": "from training.model import Image\nfrom isfe_model import f\n",
        "serving/__init__.py": "",
        "serving/app.py": "from isfe_model import f\n",
        "serving/sample.py": "import numpy\n\n\ndef build():\n    from training.model import Image\n"
                            "    import export.cli\n    from tests import helpers\n",
        "demo/__init__.py": "",
        "demo/app.py": "import isfe_model.c\n",
    })
    imports, modules = scan(root)
    assert "isfe_model.b" in modules and "isfe_model" in modules
    layers = layer_violations(imports)
    assert len(layers) == 4, layers
    assert layers[0].startswith("serving/sample.py:5: `from training.model import Image` (inside a function): "
                                "serving imports training, but serving may import only isfe_model")
    assert layers[1].startswith("serving/sample.py:6: `import export.cli` (inside a function): serving imports export")
    assert layers[2].startswith("serving/sample.py:7: `from tests import helpers`")
    assert layers[3].startswith("training/model.py:3: `importlib.import_module('serving.app')`: "
                                "training imports serving")
    deps = isfe_model_dependency_violations(imports)
    assert len(deps) == 2, deps
    assert deps[0].startswith("isfe_model/a.py:5: `import torch` (inside a function): isfe_model imports torch")
    assert deps[1].startswith("isfe_model/c.py:3: `import faiss`: isfe_model imports the optional faiss at module")
    cycles = import_cycles(imports, modules)
    assert cycles == [["isfe_model.a", "isfe_model.b"]], cycles
    msg = _cycle_message(cycles[0], imports)
    assert "isfe_model/a.py:2: `from . import b`" in msg and "isfe_model/b.py:1: `from .a import f" in msg


def test_relative_imports_resolve_like_python(tmp_path):
    root = _tree(tmp_path, {
        "training/__init__.py": "from . import sub\n",
        "training/sub/__init__.py": "from .. import x\nfrom ..x import y\nfrom . import leaf\nfrom .leaf import z\n",
        "training/sub/leaf.py": "from ...isfe_model import q\n",
        "training/x.py": "",
    })
    with pytest.raises(ValueError, match="beyond the top-level package"):
        scan(root, packages=("training",))
    (root / "training/sub/leaf.py").write_text("from ..x import q\nfrom training import x\n")
    imports, _ = scan(root, packages=("training",))
    got = {(i.importer, i.line): i.target for i in imports}
    assert got == {("training", 1): "training.sub",
                   ("training.sub", 1): "training.x", ("training.sub", 2): "training.x",
                   ("training.sub", 3): "training.sub.leaf", ("training.sub", 4): "training.sub.leaf",
                   ("training.sub.leaf", 1): "training.x", ("training.sub.leaf", 2): "training.x"}
    assert import_cycles(imports, {"training", "training.sub", "training.sub.leaf", "training.x"}) == []
