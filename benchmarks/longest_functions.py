"""List the longest functions in jaxseg/ (lines from `def` to the last line of the body).

The project's rule: no function over ~80 lines without a reason in its docstring. Run from the
repository root (or pass another root): `python benchmarks/longest_functions.py [--top 10] [ROOT]`.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path


def function_lengths(root: Path) -> list[tuple[int, str, str, bool]]:
    """(lines, "path:lineno", qualified name, whether the docstring says why it is long) for every
    def / async def under `root`."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        length = child.end_lineno - child.lineno + 1
                        why = "long" in (ast.get_docstring(child) or "").lower()
                        rows.append((length, f"{path}:{child.lineno}", name, why))
                    stack.append((child, name + "."))
                else:
                    stack.append((child, prefix))
    return sorted(rows, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="jaxseg")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--limit", type=int, default=80, help="flag longer functions whose docstring does not "
                        "say why (default 80)")
    args = parser.parse_args()
    rows = function_lengths(Path(args.root))[: args.top]
    width = max(len(r[1]) for r in rows)
    print(f"{'lines':>5}  {'where':<{width}}  function")
    for length, where, name, why in rows:
        flag = "  (over the limit, no reason given)" if length > args.limit and not why else ""
        print(f"{length:>5}  {where:<{width}}  {name}{flag}")


if __name__ == "__main__":
    main()
