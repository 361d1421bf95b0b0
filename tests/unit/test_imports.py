"""The import direction, read from the code: pipeline -> stages -> (captioning, shards).

`shards` and `captioning` import nothing of ours but themselves; `stages` never imports `pipeline`
(except in its `python -m` entry files, which call the CLI); no package imports another package's
`_private` module; nothing in the library imports the demo, the tests or the benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = {"pipeline", "stages", "captioning", "shards", "examples", "tests", "benchmarks"}
ALLOWED = {
    "shards": {"shards"},
    "captioning": {"captioning"},
    "stages": {"stages", "captioning", "shards"},
    "pipeline": {"pipeline", "stages", "captioning", "shards"},
}


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` — an entry point, not library code."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, anywhere in the file (lazy imports too), outside main blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if _is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def library_files(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    wrong = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in library_files(package)
        for module in imported_modules(path)
        if module.split(".")[0] in OURS and module.split(".")[0] not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def _private_parts(module: str) -> list[str]:
    return [part for part in module.split(".") if part.startswith("_") and not part.startswith("__")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_private_module_is_imported_from_another_package(package):
    wrong = []
    for path in library_files(package):
        own_package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
        for module in imported_modules(path):
            if module.split(".")[0] in OURS and _private_parts(module):
                owner = module[: module.index("._") if "._" in module else len(module)]
                if owner != own_package:
                    wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_lazy_imports(tmp_path):
    """The reader finds imports inside functions and skips the `__main__` block."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from pipeline.cli import main\n\nif __name__ == '__main__':\n"
        "    import examples.demo\n"
    )
    assert imported_modules(source) == ["pipeline.cli", "pipeline.cli.main"]
