"""The package's layout is its pipeline: each sub-package imports only what its docstring says it may."""

import ast
from pathlib import Path

import mmemb_lab

ROOT = Path(mmemb_lab.__file__).parent
INFRA = {"data", "runs", "distributed", "paths", "summary"}
ALLOWED = {
    "world": {"data", "runs"},
    "model": {"distributed"},
    "train": {"world", "model"} | INFRA - {"paths", "summary"},
    "eval": {"world", "model"} | INFRA,
    "method": {"world", "model", "train", "eval"} | INFRA,
    "figures": {"world", "model", "train", "eval"} | INFRA,
}
EXCEPTIONS = {("train/foundation/checkpoint.py", "mmemb_lab.method.workers"),
              ("method/shortcut.py", "mmemb_lab.figures")}
"""Imports that cross the table, each said in its package's docstring."""


def _imports(path: Path):
    """(target module, line) of every ``from mmemb_lab... import`` in one file, relative ones resolved."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package[:len(package) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        if target == "mmemb_lab":
            yield from ((f"mmemb_lab.{a.name}", node.lineno) for a in node.names)
        elif target.startswith("mmemb_lab."):
            yield target, node.lineno


def test_each_sub_package_imports_only_what_its_docstring_allows():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for target, line in _imports(path):
                unit = target.split(".")[1]
                if unit != pkg and unit not in allowed and (rel, target) not in EXCEPTIONS:
                    bad.append(f"{rel}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_every_sub_package_says_what_it_holds_and_may_import():
    for pkg in ALLOWED:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text())) or ""
        assert "May import" in doc, pkg
        for module in sorted((ROOT / pkg).glob("*.py")):
            if module.stem != "__init__":
                assert f"``{module.stem}``" in doc, (pkg, module.stem)


def test_the_public_names_are_where_users_reach_for_them():
    from mmemb_lab import Embedder
    from mmemb_lab.embedder import Embedder as Inner

    assert Embedder is Inner
