"""Functions of seesaw_ds that a coverage run never entered, and the per-module coverage table.

    python -m pytest --cov=seesaw_ds --cov-report= tests        # writes .coverage (settings in setup.cfg)
    python evals/dead_code.py [--data .coverage] [--public-only]

A function counts as entered when any line of its body ran. Accelerator-only paths (CUDA streams, pinned
staging) cannot run on these CPU machines and show up here by design; the report says so per function.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "seesaw_ds"


def functions(path: Path):
    """(qualified name, first body line, last line) of every function and method in a file."""
    tree = ast.parse(path.read_text())

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = child.body[1:] if ast.get_docstring(child) and len(child.body) > 1 else child.body
                yield f"{prefix}{child.name}", body[0].lineno, child.end_lineno
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def is_public(name: str) -> bool:
    return not any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / ".coverage"))
    parser.add_argument("--public-only", action="store_true")
    args = parser.parse_args()
    import coverage
    cov = coverage.Coverage(data_file=args.data)
    cov.load()
    data = cov.get_data()
    rows, never = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        executed = set(data.lines(str(path)) or ())
        _, statements, _, missing, _ = cov.analysis2(str(path))
        covered = len(statements) - len(missing)
        rows.append((str(path.relative_to(REPO)), len(statements), covered))
        for name, first, last in functions(path):
            if args.public_only and not is_public(name):
                continue
            if not executed & set(range(first, last + 1)):
                never.append((str(path.relative_to(REPO)), name, first))
    width = max(len(r[0]) for r in rows)
    print(f"{'module':<{width}}  stmts  cover")
    for name, stmts, covered in rows:
        print(f"{name:<{width}}  {stmts:5d}  {100 * covered / max(stmts, 1):4.0f}%")
    print(f"\nfunctions never entered ({len(never)}):")
    for module, name, line in never:
        print(f"  {module}:{line}  {name}")


if __name__ == "__main__":
    main()
