"""A function's source as the console shows it: read, highlighted (pygments, classes only), diffed."""

from __future__ import annotations

import difflib
import os

from markupsafe import Markup, escape
from pygments import highlight as _highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

MAX_SHOWN = 512 * 1024

_FORMATTER = HtmlFormatter(cssclass="hl", linenos="table", lineanchors="L", wrapcode=True)


def live_source(functions_dir: str, name: str) -> tuple[str | None, str]:
    """(source, kind) of what /function/<name> runs now: a module's file, or a package's __init__.py."""
    for path, kind in ((os.path.join(functions_dir, name + ".py"), "module"),
                       (os.path.join(functions_dir, name, "__init__.py"), "package")):
        if os.path.isfile(path):
            return _read(path), kind
    return None, "missing"


def version_source(versions_dir: str, name: str, version: int) -> str | None:
    vdir = os.path.join(versions_dir, name, str(version))
    for rel in (name + ".py", "__init__.py"):
        path = os.path.join(vdir, rel)
        if os.path.isfile(path):
            return _read(path)
    return None


def _read(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_SHOWN + 1)
    text = data[:MAX_SHOWN].decode("utf-8", "replace")
    return text + ("\n# ... (truncated)\n" if len(data) > MAX_SHOWN else "")


def highlight(source: str) -> Markup:
    return Markup(_highlight(source, PythonLexer(), _FORMATTER))


def stylesheet() -> str:
    """Light and dark token colours, switched by the reader's colour scheme."""
    def tokens(style: str) -> str:
        # Token colours only: the page's own stylesheet sets the block's background, line numbers and fonts.
        return "\n".join(ln for ln in HtmlFormatter(style=style).get_style_defs(".hl").splitlines()
                         if ln.startswith(".hl .") and "background-color" not in ln.split("{", 1)[1][:30])

    return f"{tokens('friendly')}\n@media (prefers-color-scheme: dark) {{\n{tokens('monokai')}\n}}\n"


def diff(old: str, new: str, old_label: str, new_label: str) -> Markup:
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), old_label, new_label, lineterm="", n=3)
    out = []
    for line in lines:
        cls = ("hunk" if line.startswith("@@") else "meta" if line.startswith(("---", "+++"))
               else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        out.append(f'<span class="d-{cls}">{escape(line)}</span>')
    if not out:
        return Markup('<p class="muted">No difference.</p>')
    return Markup('<pre class="diff">' + "\n".join(out) + "</pre>")
