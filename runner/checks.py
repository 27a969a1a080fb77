"""`fnbox check`: what would fail at call time, found without running anything.

The profiles folder is validated (file, key, reason); every function of the functions folder is compiled (a
syntax error is `file:line`) and read for its entry point (`main`, or its profile's entry_point, or one
`@functions_framework.http` function). Nothing is imported: checking never runs a function's code outside the
sandbox.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

from runner.profiles import ProfileError, ProfileSet, function_names, load_profiles


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}" if self.line else f"{self.path}: {self.reason}"


def _function_files(functions_dir: str, name: str) -> tuple[str, list[str]]:
    """(the file defining the entry point, every .py file of the function)."""
    pkg = os.path.join(functions_dir, name)
    if os.path.isfile(os.path.join(pkg, "__init__.py")):
        files = []
        for d, dirs, fs in os.walk(pkg):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            files += [os.path.join(d, f) for f in sorted(fs) if f.endswith(".py")]
        return os.path.join(pkg, "__init__.py"), files
    path = os.path.join(functions_dir, name + ".py")
    return path, [path]


def _is_ff_http(decorator: ast.expr) -> bool:
    """`@functions_framework.http` or `@http` (from functions_framework import http)."""
    if isinstance(decorator, ast.Attribute):
        return decorator.attr == "http" and isinstance(decorator.value, ast.Name) and \
            decorator.value.id == "functions_framework"
    return isinstance(decorator, ast.Name) and decorator.id == "http"


def _top_level_names(tree: ast.Module) -> tuple[set[str], list[str], bool]:
    """(names bound at module level, functions decorated as functions_framework http, star import present)."""
    names: set[str] = set()
    ff_http: list[str] = []
    star = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            if not isinstance(node, ast.ClassDef) and any(_is_ff_http(d) for d in node.decorator_list):
                ff_http.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    star = True
                else:
                    names.add((alias.asname or alias.name).split(".")[0])
    return names, ff_http, star


def check_function(functions_dir: str, name: str, entry_point: str) -> list[Problem]:
    problems = []
    main_file, files = _function_files(functions_dir, name)
    trees: dict[str, ast.Module] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                source = f.read()
            trees[path] = ast.parse(source, filename=path)
        except SyntaxError as e:
            problems.append(Problem(path, e.lineno, f"SyntaxError: {e.msg}"))
        except (OSError, ValueError) as e:
            problems.append(Problem(path, None, f"cannot read: {e}"))
    tree = trees.get(main_file)
    if tree is None:
        return problems
    names, ff_http, star = _top_level_names(tree)
    if entry_point in names or star:
        return problems
    if entry_point == "main" and len(ff_http) == 1:
        return problems  # runs the one @functions_framework.http function
    hint = (f"; it has {', '.join(ff_http)} decorated with @functions_framework.http: set entry_point = "
            f"\"{ff_http[0]}\" in functions.toml" if ff_http else "")
    other = [n for n in ("main", "handler", name) if n in names and n != entry_point]
    if not hint and other:
        hint = f"; it defines {other[0]}(): set entry_point = \"{other[0]}\" for [{name}] in functions.toml"
    problems.append(Problem(main_file, 1, f"no entry point: define `{entry_point}(request)`{hint}"))
    return problems


def check(profiles_dir: str, functions_dir: str) -> tuple[ProfileSet | None, list[Problem]]:
    """Validates everything; returns the profiles (None if invalid) and every problem found."""
    problems: list[Problem] = []
    try:
        pset: ProfileSet | None = load_profiles(profiles_dir)
    except ProfileError as e:
        pset = None
        problems.append(Problem(e.path, None, f"{e.key}: {e.reason}" if e.key else e.reason))
    names = function_names(functions_dir)
    try:
        entries = sorted(os.listdir(functions_dir))
    except OSError as e:
        return pset, [*problems, Problem(functions_dir, None, f"cannot list: {e.strerror}")]
    for entry in entries:
        base = entry[:-3] if entry.endswith(".py") else entry
        if entry.endswith(".py") and not base.startswith(("_", ".")) and not base.isidentifier():
            fixed = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
            problems.append(Problem(os.path.join(functions_dir, entry), None, "never served: a function's name is a "
                                    f"Python identifier (rename it {fixed}.py)"))
    for name in names:
        entry = pset.for_function(name).entry_point if pset else "main"
        problems += check_function(functions_dir, name, entry)
    return pset, problems
