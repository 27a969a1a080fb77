"""What runs inside one call's process, after the sandbox is entered: read the request, import the function
fresh from disk, call main(request) the way Flask would call a view, and write the response to fd 3.

The Flask app below is built once in the fork server (so the child inherits it warm) and has the seed's two
routes, so `request.view_args`, `request.url_rule`, `flask.jsonify`, `abort()` and every return form behave
exactly as in a Flask view. The function never sees the gateway's app, socket or environment.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
import tempfile
import traceback
import types
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from runner import outcomes
from runner.protocol import CHILD_RESULT_FD, encode_frame, read_frame, write_all

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
MAX_RESPONSE_HEADERS = 64 * 1024
PACKAGE = "functions"

_main: Any = None


def _view(func_name: str, subpath: str) -> Any:
    return _main(flask.request)


def build_app() -> flask.Flask:
    app = flask.Flask("fnbox_function", root_path="/")
    # Exceptions from main must reach run() (to be reported as function_error), not become Flask's HTML 500.
    app.config["PROPAGATE_EXCEPTIONS"] = True
    for rule, defaults in (("/function/<func_name>", {"subpath": ""}),
                           ("/function/<func_name>/", {"subpath": ""}),
                           ("/function/<func_name>/<path:subpath>", None)):
        app.add_url_rule(rule, endpoint="main", view_func=_view, methods=METHODS, defaults=defaults,
                         strict_slashes=False)
    return app


APP = build_app()


def _load(functions_dir: str, name: str) -> types.ModuleType:
    """Imports `functions.<name>` from functions_dir, as the seed's importlib.import_module did."""
    # As Google's runtime does, the functions folder is also on sys.path so sibling modules import plainly.
    sys.path.insert(0, functions_dir)
    init = os.path.join(functions_dir, "__init__.py")
    if os.path.exists(init):
        spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[functions_dir])
        assert spec and spec.loader
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pkg
        spec.loader.exec_module(pkg)
    else:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [functions_dir]
        sys.modules[PACKAGE] = pkg
    target = os.path.join(functions_dir, name)
    if os.path.islink(target):
        # A deployed package: resolve its symlink once, so that a deploy switching it during this call can
        # never give us __init__ from one version and a submodule from another.
        real = os.path.realpath(target)
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", os.path.join(real, "__init__.py"),
                                                      submodule_search_locations=[real])
        if spec is None or spec.loader is None or not os.path.isfile(os.path.join(real, "__init__.py")):
            raise ModuleNotFoundError(f"No module named '{PACKAGE}.{name}'", name=f"{PACKAGE}.{name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(pkg, name, module)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(f"{PACKAGE}.{name}")


def _error(outcome: str, exc: BaseException | None = None, message: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"kind": "error", "outcome": outcome}
    if exc is not None:
        frame["type"] = type(exc).__name__
        frame["message"] = message if message is not None else str(exc)
        frame["traceback"] = "".join(traceback.format_exception(exc))
    elif message is not None:
        frame["message"] = message
    return frame


def _serialize(resp: flask.Response, max_body: int) -> tuple[dict[str, Any], bytes]:
    headers = resp.headers.to_wsgi_list()
    if sum(len(k) + len(v) + 4 for k, v in headers) > MAX_RESPONSE_HEADERS:
        return _error(outcomes.OUTPUT_LIMIT, message="response headers exceed 64 KiB"), b""
    chunks, size = [], 0
    try:
        for chunk in resp.iter_encoded():
            size += len(chunk)
            if size > max_body:
                return _error(outcomes.OUTPUT_LIMIT,
                              message=f"response body exceeds max_response_kb ({max_body // 1024} KiB)"), b""
            chunks.append(chunk)
    finally:
        resp.close()
    return {"kind": "response", "status": resp.status, "headers": headers}, b"".join(chunks)


def run(functions_dir: str, name: str, max_response_kb: int) -> dict[str, Any] | tuple[dict[str, Any], bytes]:
    global _main
    header, body = read_frame(0)
    # The profile's [env] comes from the gateway with the request, never through the fork server (see
    # runner.supervisor): the sandbox gave this process a minimal environment, the function's own is added here.
    os.environ.update(header.get("env") or {})
    environ: dict[str, Any] = dict(header["environ"])
    environ.update({
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": True,
        "wsgi.input_terminated": True,
    })
    try:
        module = _load(functions_dir, name)
    except ModuleNotFoundError as e:
        if e.name in (f"{PACKAGE}.{name}", PACKAGE):
            return _error(outcomes.NOT_FOUND, message=f"no function named {name!r}")
        return _error(outcomes.FUNCTION_ERROR, e)
    except MemoryError as e:
        return _error(outcomes.MEMORY_LIMIT, e, "memory limit reached while importing the function")
    except BaseException as e:
        return _error(outcomes.FUNCTION_ERROR, e)
    _main = getattr(module, "main", None)
    if not callable(_main):
        return _error(outcomes.NO_MAIN, message="Function must define a `main(request)` method")
    APP.root_path = functions_dir
    try:
        with APP.request_context(environ):
            try:
                resp = APP.full_dispatch_request()
            except HTTPException as e:  # raised from a place Flask does not catch (e.g. make_response)
                resp = e.get_response()
            return _serialize(resp, max_response_kb * 1024)
    except MemoryError as e:
        return _error(outcomes.MEMORY_LIMIT, e, "memory limit reached (MemoryError)")
    except BaseException as e:
        return _error(outcomes.FUNCTION_ERROR, e)


WARM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm")


def warm(full: bool = True) -> None:
    """Runs the call path once with a built-in function (runner/warm/probe.py, never user code): its import
    through _load(), then a request through Flask. full (the fork server, once): a multipart POST that loads
    every lazily imported module (idna, the JSON provider, form parsing, cookies). Not full (a spare): a GET, so
    that the spare pays the common path's copy-on-write faults before its call. Everything imported under the
    functions package name is forgotten again."""
    global _main
    body = b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\n\r\nx\r\n--b--\r\n"
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/function/probe/a/b", "QUERY_STRING": "a=1",
               "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr}
    if full:
        environ.update({"REQUEST_METHOD": "POST", "CONTENT_TYPE": "multipart/form-data; boundary=b",
                        "CONTENT_LENGTH": str(len(body)), "HTTP_COOKIE": "a=b", "wsgi.input": io.BytesIO(body)})
    try:
        _main = _load(WARM_DIR, "probe").main
        with APP.request_context(environ):
            _serialize(APP.full_dispatch_request(), 1 << 20)
    finally:
        _main = None
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        while WARM_DIR in sys.path:
            sys.path.remove(WARM_DIR)
        sys.path_importer_cache.pop(WARM_DIR, None)


def main(functions_dir: str, name: str, max_response_kb: int) -> None:
    """Entry point in the forked, sandboxed child. Never returns."""
    tempfile.tempdir = None  # TMPDIR was just changed to the call's scratch dir
    # stdout is a pipe, so block-buffered: a print() before a timeout, a crash or os._exit() would die in the
    # buffer and never reach the log. Line-buffered, like stderr already is.
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):
        pass
    oom_frame = encode_frame(_error(outcomes.MEMORY_LIMIT, message="memory limit reached (MemoryError)"))
    code = 0
    try:
        try:
            result = run(functions_dir, name, max_response_kb)
            if isinstance(result, dict):
                data = encode_frame(result)
            else:
                data = encode_frame(result[0]) + result[1]
        except MemoryError:
            data = oom_frame
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        write_all(CHILD_RESULT_FD, data)
        # Closing every pipe tells the gateway the answer is complete now, before the exit and reaping of this
        # process (several ms for a forked interpreter) that nobody needs to wait for.
        os.closerange(0, CHILD_RESULT_FD + 1)
    except BaseException:
        code = 70  # EX_SOFTWARE: the runner itself failed; the gateway reports the call as crashed
    os._exit(code)
