"""The package's layering rules, read from the source: no private name crosses a module boundary, and geometry
and plots never import a model library."""

import ast
import json
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _sources():
    for p in [*ROOT.glob("castlens/**/*.py"), *ROOT.glob("benchmarks/*.py")]:  # tests may test a module's own parts
        yield p, p.read_text()
    for p in ROOT.glob("notebooks/*.ipynb"):
        nb = json.loads(p.read_text())
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        yield p, "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))


def private_imports(source: str) -> list[str]:
    """``from castlens.x import _y``, ``castlens.x._y`` and ``alias._y`` for an imported castlens module."""
    tree = ast.parse(source)
    aliases, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("castlens"):
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("castlens")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                bad.append(f"{ast.unparse(node)}")
    return bad


def test_the_checker_finds_what_it_looks_for():
    assert private_imports("from castlens.transfer import _prefix") == ["castlens.transfer._prefix"]
    assert private_imports("from castlens import transfer\ntransfer._split_dev(1)") == ["transfer._split_dev"]
    assert private_imports("import castlens.vectors\ncastlens.vectors._atomic_write(1)") == \
        ["castlens.vectors._atomic_write"]
    assert private_imports("from castlens.vectors import save_vectors\nx._y = 1") == []


def test_no_module_notebook_or_benchmark_imports_a_private_name():
    found = {str(p.relative_to(ROOT)): b for p, src in _sources() if (b := private_imports(src))}
    assert not found, found


def test_geometry_and_plots_import_no_model_library():
    for name in ("geometry", "plots", "files", "compose", "selection", "tasks", "prompts"):
        tree = ast.parse((ROOT / "castlens" / f"{name}.py").read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
            {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in mods if m.startswith(("transformer_lens", "transformers", "castlens.models"))}, name
