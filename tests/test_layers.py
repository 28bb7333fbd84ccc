"""The package's shape: imports go one way only, and nothing grows past what a reader can hold.

Every module of ``zfserve`` (and ``kernels/``, installed as ``zfserve.kernels``) is parsed, and every import
in it, lazy ones inside functions included, is checked against the layer order

    errors/config/architecture < kernels < model < weights/preprocess/data/_checks/import_torchvision
    < engine/export/render < train/evaluate < paper < audit < wire < server/client < cli

A module may import its own layer or those before it; the import graph has no cycles. Functions outside
``kernels/`` stay within 80 lines and modules within 600 (generated protobuf stubs excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The layers, lowest first. A key is the first component below ``zfserve`` (the package root and the
# generated stubs in ``_proto`` import nothing of ours above them, so they sit with the lowest layer).
LAYERS = (
    {"", "errors", "config", "architecture", "capabilities", "_proto"},
    {"kernels"},
    {"model"},
    {"weights", "preprocess", "data", "_checks", "import_torchvision", "onnx_graph"},
    {"engine", "export", "render", "import_onnx"},
    {"train", "evaluate"},
    {"paper"},
    {"audit"},
    {"wire"},
    {"server", "client"},
    {"cli"},
)
LEVEL = {key: level for level, keys in enumerate(LAYERS) for key in keys}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def package_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for ``zfserve/**`` and ``kernels/**`` (as ``zfserve.kernels``)."""
    files = {}
    for base, dotted in ((root / "zfserve", "zfserve"), (root / "kernels", "zfserve.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([dotted, *parts])] = path
    return files


def _resolve(module: str, path: Path, node: ast.ImportFrom, known) -> list[str]:
    """The zfserve modules a ``from ... import ...`` statement reads (a submodule when a name is one)."""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base != "zfserve" and not base.startswith("zfserve."):
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]


def imports_of(module: str, path: Path, known) -> set[str]:
    """Every zfserve module ``module`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "zfserve")
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, path, node, known))
    # ``import zfserve.a.b`` also imports zfserve.a; only the deepest known module matters here.
    return {_known_prefix(name, known) for name in found} - {module, None}


def _known_prefix(name: str, known) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path = ROOT) -> tuple[list[str], list[list[str]]]:
    """(imports against the order, import cycles) of the tree under ``root``."""
    files = package_files(root)
    graph = {module: imports_of(module, path, files) for module, path in files.items()}
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer_key(module), layer_key(target)
            if here not in LEVEL or there not in LEVEL:
                wrong.append(f"{module} -> {target}: module not in any layer (add it to LAYERS)")
            elif LEVEL[there] > LEVEL[here]:
                wrong.append(f"{module} (layer {LEVEL[here]}) imports {target} (layer {LEVEL[there]})")
    return wrong, _cycles(graph)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def oversized(root: Path = ROOT) -> list[str]:
    """Functions over MAX_FUNCTION_LINES (outside kernels/) and modules over MAX_MODULE_LINES."""
    out = []
    for module, path in package_files(root).items():
        if module.startswith("zfserve._proto"):
            continue
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(root)}: {lines} lines (at most {MAX_MODULE_LINES})")
        if module.startswith("zfserve.kernels"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines "
                               f"(at most {MAX_FUNCTION_LINES})")
    return out


# ---------------------------------------------------------------------------------------------- the tree
def test_every_import_follows_the_layer_order():
    wrong, _ = violations()
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    _, cycles = violations()
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_functions_and_modules_stay_small():
    found = oversized()
    assert not found, "\n".join(found)


def test_every_module_belongs_to_a_layer():
    keys = {layer_key(module) for module in package_files()}
    assert keys <= set(LEVEL), sorted(keys - set(LEVEL))


# ---------------------------------------------------------------------------------------------- the checker
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("importer, module, statement", [
    ("zfserve/model.py", "zfserve.model", "def f():\n    from .weights import load_model\n"),   # lazy
    ("zfserve/engine/deconv.py", "zfserve.engine.deconv", "import zfserve.train\n"),           # absolute
    ("zfserve/render.py", "zfserve.render", "from zfserve import cli\n"),                      # by name
    ("kernels/ops.py", "zfserve.kernels.ops", "from zfserve.model import ZFNet\n"),            # kernels/
    ("zfserve/data/folders.py", "zfserve.data.folders", "from ..paper import report\n"),       # two up
])
def test_checker_catches_upward_imports(tmp_path, importer, module, statement):
    root = _tree(tmp_path, {"zfserve/__init__.py": "", "zfserve/model.py": "", "zfserve/weights.py": "",
                            "zfserve/render.py": "", "zfserve/cli.py": "", "zfserve/train/__init__.py": "",
                            "zfserve/engine/__init__.py": "", "zfserve/engine/deconv.py": "",
                            "zfserve/data/__init__.py": "", "zfserve/data/folders.py": "",
                            "zfserve/paper/__init__.py": "", "zfserve/paper/report.py": "",
                            "kernels/__init__.py": "", "kernels/ops.py": ""})
    (root / importer).write_text(statement)
    wrong, _ = violations(root)
    assert len(wrong) == 1 and wrong[0].startswith(f"{module} (layer"), wrong


def test_checker_allows_downward_and_same_layer_but_not_cycles(tmp_path):
    root = _tree(tmp_path, {"zfserve/__init__.py": "", "zfserve/errors.py": "",
                            "zfserve/weights.py": "from .errors import ZFServeError\nfrom . import preprocess\n",
                            "zfserve/preprocess.py": "def f():\n    from .weights import x\n"})
    wrong, cycles = violations(root)
    assert wrong == [] and cycles == [["zfserve.preprocess", "zfserve.weights"]]


def test_checker_measures_function_and_module_length(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))   # def line + 80 = 81 lines
    root = _tree(tmp_path, {"zfserve/__init__.py": "", "zfserve/long.py": "def long():\n" + body,
                            "zfserve/fine.py": "def fine():\n" + body[: body.rindex("    x")],
                            "kernels/__init__.py": "def kernel():\n" + body,
                            "zfserve/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1)})
    found = oversized(root)
    assert len(found) == 2 and "long: 81 lines" in found[0] + found[1] and "big.py: 601 lines" in " ".join(found)
