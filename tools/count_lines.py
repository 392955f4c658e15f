"""Count code lines of tiltflow/*.py: lines that are not blank, comment or docstring.

Usage: python3 tools/count_lines.py [REV] [--files] [--exclude PATH ...]
REV is a git revision (default: the working tree). --files prints one line per file;
--exclude drops files at or under the given paths.
"""

import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path

SKIPPED_TOKENS = (
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
)


def docstring_lines(tree):
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(src):
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return 0
    docs = docstring_lines(tree)
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in SKIPPED_TOKENS:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return len(lines)


def sources(rev):
    """Yield (path, text) for every tiltflow/*.py at `rev`, or in the working tree when rev is None."""
    if rev is None:
        for path in sorted(Path("tiltflow").rglob("*.py")):
            yield str(path), path.read_text()
        return
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "tiltflow"], capture_output=True, text=True, check=True
    )
    for path in listing.stdout.split():
        if path.endswith(".py"):
            shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True)
            yield path, shown.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", default=None, help="git revision (default: working tree)")
    parser.add_argument("--files", action="store_true", help="print per-file counts")
    parser.add_argument("--exclude", nargs="*", default=[], help="paths to leave out")
    args = parser.parse_args()
    excluded = [e.rstrip("/") for e in args.exclude]
    total_code = total_physical = 0
    for path, src in sources(args.rev):
        if any(path == e or path.startswith(e + "/") for e in excluded):
            continue
        code, physical = code_lines(src), src.count("\n")
        total_code += code
        total_physical += physical
        if args.files:
            print(f"{code:6d} {physical:6d} {path}")
    print(args.rev or "working-tree", "code", total_code, "physical", total_physical)


if __name__ == "__main__":
    main()
