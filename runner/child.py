"""What runs inside one call's process, after the sandbox is entered: read the request, import the function
fresh from disk, call main(request) the way Flask would call a view, and write the response to fd 3.

The Flask app below is built once in the fork server (so the child inherits it warm) and has the seed's two
routes, so `request.view_args`, `request.url_rule`, `flask.jsonify`, `abort()` and every return form behave
exactly as in a Flask view. The function never sees the gateway's app, socket or environment.
"""

from __future__ import annotations

import errno
import importlib
import importlib.machinery
import importlib.util
import io
import os
import socket
import sys
import tempfile
import traceback
import types
from collections.abc import Callable
from typing import Any

import flask
from flask.ctx import RequestContext
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType

from runner import deps, outcomes
from runner.profiles import Profile
from runner.protocol import CHILD_RESULT_FD, encode_frame, read_frame, write_all

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
MAX_RESPONSE_HEADERS = 64 * 1024
PACKAGE = "functions"

_main: Any = None


def _view(func_name: str, subpath: str) -> Any:
    return _main(flask.request)


class _Request(flask.Request):
    """Flask's request, whose get_json() failures are the platform's JSON errors (400 bad_request on bad JSON,
    415 unsupported_media_type without a JSON Content-Type) rather than werkzeug's HTML pages. A function that
    catches them, or raises its own abort(415), still answers what it wants."""

    def on_json_loading_failed(self, e: ValueError | None) -> Any:
        if e is None:
            code, status = "unsupported_media_type", 415
            message = (f"the function reads the body as JSON, but the request's Content-Type is "
                       f"{self.mimetype or 'missing'!r}, not 'application/json' (curl: -H 'Content-Type: "
                       "application/json')")
        else:
            code, status, message = "bad_request", 400, f"the request body is not valid JSON: {e}"
        body = {"error": code, "message": message, "function": (self.view_args or {}).get("func_name"),
                "request_id": self.environ.get("fnbox.request_id")}
        resp = flask.Response(flask.json.dumps(body) + "\n", status=status, mimetype="application/json")
        raise (UnsupportedMediaType if e is None else BadRequest)(response=resp)


def build_app() -> flask.Flask:
    app = flask.Flask("fnbox_function", root_path="/")
    app.request_class = _Request
    # Exceptions from main must reach run() (to be reported as function_error), not become Flask's HTML 500.
    app.config["PROPAGATE_EXCEPTIONS"] = True
    for rule, defaults in (("/function/<func_name>", {"subpath": ""}),
                           ("/function/<func_name>/", {"subpath": ""}),
                           ("/function/<func_name>/<path:subpath>", None)):
        app.add_url_rule(rule, endpoint="main", view_func=_view, methods=METHODS, defaults=defaults,
                         strict_slashes=False)
    return app


APP = build_app()
_SESSION_INTERFACE = APP.session_interface
_NULL_SESSION = _SESSION_INTERFACE.make_null_session(APP)  # what every call without a secret key gets
_request_started, _request_finished = flask.request_started, flask.request_finished


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
    path = target + ".py"
    if os.path.isdir(target) or not os.path.isfile(path):
        return importlib.import_module(f"{PACKAGE}.{name}")  # a package, a namespace folder, or nothing
    return _exec_file(pkg, f"{PACKAGE}.{name}", path)


def _exec_file(pkg: types.ModuleType, fullname: str, path: str) -> types.ModuleType:
    """What importlib.import_module() does for a plain module file, without its search: no finder lists the
    functions folder, no byte-code cache is looked for or written (a call's folder is read-only), no spec search.
    That machinery is ~90-110 copy-on-write faults (~0.5 ms) of a fresh call (bench/child_faults.py); the module
    gets the same attributes (__spec__ with a SourceFileLoader, so tracebacks, inspect and reload work), the
    same code (compile() reads the coding cookie as the loader does) and the same failure semantics (not left in
    sys.modules when its body raises)."""
    loader = importlib.machinery.SourceFileLoader(fullname, path)
    spec = importlib.machinery.ModuleSpec(fullname, loader, origin=path)
    spec.has_location = True
    with open(path, "rb") as f:
        source = f.read()
    code = compile(source, path, "exec", dont_inherit=True)
    module = importlib.util.module_from_spec(spec)
    spec._initializing = True  # what a circular import's "partially initialized module" message reads
    sys.modules[fullname] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(fullname, None)
        raise
    finally:
        spec._initializing = False
    module = sys.modules[fullname]  # as importlib does: the body may have replaced itself in sys.modules
    setattr(pkg, fullname.rpartition(".")[2], module)
    return module


def _error(outcome: str, exc: BaseException | None = None, message: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"kind": "error", "outcome": outcome}
    if exc is not None:
        frame["type"] = type(exc).__name__
        frame["message"] = message if message is not None else str(exc)
        frame["traceback"] = user_traceback(exc)
        frame["full_traceback"] = "".join(traceback.format_exception(exc))
    elif message is not None:
        frame["message"] = message
    return frame


# Frames of the platform (this runner, Flask, werkzeug, the import machinery) that lead to the function's own.
_PLATFORM_PREFIXES = tuple(os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep
                           for m in (sys.modules[__name__], flask, sys.modules["werkzeug"]))


def _platform_frame(filename: str) -> bool:
    return filename.startswith(_PLATFORM_PREFIXES) or filename.startswith("<frozen importlib")


def user_traceback(exc: BaseException) -> str:
    """The traceback from the function's first own frame on: the frames through which the runner, Flask and
    importlib reached it are dropped (in every exception of a chain). Frames after the user's (a library the
    function called) stay: they say where it failed. If no frame is the user's, the whole stack is kept."""
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    stack = [te]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        keep = next((i for i, f in enumerate(t.stack) if not _platform_frame(f.filename)), None)
        if keep:
            del t.stack[:keep]
        elif keep is None and isinstance(exc, SyntaxError):
            del t.stack[:]  # the syntax error's own lines name the file and line
        stack.extend(x for x in (t.__cause__, t.__context__) if x is not None)
    return "".join(te.format())


# errnos of "there is no network here": what a call sees in an empty network namespace.
_NET_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL,
                         errno.ECONNREFUSED})


def _is_network_error(exc: BaseException) -> bool:
    """Whether exc (or what it wraps: __cause__, __context__, URLError.reason, requests' args) is a failed name
    lookup or connection."""
    todo, seen = [exc], set()
    while todo and len(seen) < 20:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror | ConnectionError) or (isinstance(e, OSError) and e.errno in _NET_ERRNOS):
            return True
        if "NameResolution" in type(e).__name__ or "NewConnectionError" in type(e).__name__:
            return True
        more = [e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())]
        todo.extend(x for x in more if isinstance(x, BaseException))
    return False


NETWORK_OFF_HINT = ("; this function's profile has network = false: its calls run with no network at all (no "
                    "DNS, not even 127.0.0.1). To allow it, set `network = true` for it in functions.toml "
                    "(docs/operators.md)")


def _importable(top: str) -> bool:
    """Whether a top-level module exists (`import pkg.nosuchsub` fails in an installed package: not missing)."""
    if top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _missing_package(exc: ModuleNotFoundError) -> str:
    top = (exc.name or "?").split(".")[0]
    return (f"No module named {top!r}: the function imports {top!r}, which is not installed. Add the package "
            f"that provides it to requirements.txt in the functions folder, then run `fnbox deps install` "
            f"(docs/functions.md, Dependencies)")


# Made once, in the fork server: a call that runs out of memory needs no allocation to say so, and no call
# spends its own page faults on encoding the same bytes.
OOM_FRAME = encode_frame(_error(outcomes.MEMORY_LIMIT, message="memory limit reached (MemoryError)"))


def _failure(exc: BaseException, network: bool) -> dict[str, Any]:
    """The error frame of an exception raised by importing or calling the function."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith(PACKAGE + ".") \
            and not _importable(exc.name.split(".")[0]):
        return _error(outcomes.MISSING_DEPENDENCY, exc, _missing_package(exc))
    if not network and _is_network_error(exc):
        return _error(outcomes.FUNCTION_ERROR, exc, str(exc) + NETWORK_OFF_HINT)
    return _error(outcomes.FUNCTION_ERROR, exc)


def entry_point(module: types.ModuleType, name: str) -> Any:
    """The callable a call runs: the module's `name` (the profile's entry_point, `main` by default). A module
    without `main` whose only `@functions_framework.http` function is defined in it runs that one."""
    fn = getattr(module, name, None)
    if callable(fn) or name != "main":
        return fn if callable(fn) else None
    ff = sys.modules.get("functions_framework")
    registered = [f for f in getattr(ff, "_http_functions", ()) if getattr(f, "__module__", None) == module.__name__]
    return registered[0] if len(registered) == 1 else None


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


def read_request() -> dict[str, Any]:
    """The call's request from stdin: its WSGI environ, and the function's [env] added to os.environ."""
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
        "fnbox.request_id": header.get("request_id"),
    })
    return environ


def import_function(functions_dir: str, name: str, profile: Profile) -> types.ModuleType | dict[str, Any]:
    """The function's module, or the error frame that says why it cannot be imported."""
    deps.activate()
    try:
        return _load(functions_dir, name)
    except ModuleNotFoundError as e:
        if e.name in (f"{PACKAGE}.{name}", PACKAGE):
            return _error(outcomes.NOT_FOUND, message=f"no function named {name!r}")
        return _failure(e, profile.network)
    except MemoryError as e:
        return _error(outcomes.MEMORY_LIMIT, e, "memory limit reached while importing the function")
    except BaseException as e:
        return _failure(e, profile.network)


def _full_dispatch(ctx: Any) -> flask.Response:
    """APP.full_dispatch_request(), minus the steps that have nothing to do: signals without receivers,
    before/after-request hooks that are not registered, saving a null session. Each skipped step is still taken
    when something is registered for it (a function may connect a signal at import, or call
    after_this_request), so the outcome is the same; what a fresh call saves is the copy-on-write faults of
    walking Flask's machinery (bench/child_faults.py)."""
    APP._got_first_request = True
    try:
        if _request_started.receivers:
            _request_started.send(APP, _async_wrapper=APP.ensure_sync)
        rv = APP.preprocess_request() if APP.url_value_preprocessors or APP.before_request_funcs else None
        if rv is None:
            rv = APP.dispatch_request()
    except Exception as e:
        rv = APP.handle_user_exception(e)
    if (ctx._after_request_functions or APP.after_request_funcs or _request_finished.receivers
            or not APP.session_interface.is_null_session(ctx._session)):
        return APP.finalize_request(rv)
    return APP.make_response(rv)


def _request_context(environ: dict[str, Any]) -> Any:
    """APP.request_context(environ), with the fork server's ready-made null session when the app has no
    secret key and its own session interface (what open_session() would return anyway)."""
    if APP.secret_key is None and APP.session_interface is _SESSION_INTERFACE:
        return RequestContext(APP, environ, session=_NULL_SESSION)
    return APP.request_context(environ)


def _respond(environ: dict[str, Any], max_body: int, fresh: bool) -> tuple[dict[str, Any], bytes]:
    """The view's response to environ, serialized. fresh: this process ends after the call, so the request
    context is never popped (teardown has nothing registered, the request's files die with the process)."""
    ctx = _request_context(environ)
    ctx.push()
    try:
        try:
            resp = _full_dispatch(ctx)
        except HTTPException as e:  # raised from a place Flask does not catch (e.g. make_response)
            resp = e.get_response()
        result = _serialize(resp, max_body)
    except BaseException as e:
        ctx.pop(e)
        raise
    if not fresh:
        ctx.pop(None)
    return result


def dispatch(module: types.ModuleType, functions_dir: str, name: str, profile: Profile,
             environ: dict[str, Any], fresh: bool = False) -> dict[str, Any] | tuple[dict[str, Any], bytes]:
    """Runs the module's entry point on the request through Flask; the result frame (header, body). fresh:
    the process exits after this call (a warm instance's does not)."""
    global _main
    _main = entry_point(module, profile.entry_point)
    if _main is None:
        where = "" if profile.entry_point == "main" else " (the entry_point of its profile)"
        return _error(outcomes.NO_ENTRY_POINT, message=f"function {name!r} must define a callable "
                      f"`{profile.entry_point}(request)`{where}")
    APP.root_path = functions_dir
    try:
        return _respond(environ, profile.max_response_kb * 1024, fresh)
    except MemoryError as e:
        return _error(outcomes.MEMORY_LIMIT, e, "memory limit reached (MemoryError)")
    except BaseException as e:
        return _failure(e, profile.network)


def run(functions_dir: str, name: str, profile: Profile) -> dict[str, Any] | tuple[dict[str, Any], bytes]:
    environ = read_request()
    module = import_function(functions_dir, name, profile)
    if isinstance(module, dict):
        return module
    return dispatch(module, functions_dir, name, profile, environ, fresh=True)


WARM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm")


_warmed = False


def warm() -> None:
    """Runs the call path once in the fork server with a built-in function (runner/warm/probe.py, never user
    code): its import through _load(), then a multipart POST through Flask, which loads every lazily imported
    module (idna, the JSON provider, form parsing, cookies), so that no call pays for an import. Everything
    imported under the functions package name is forgotten again. (A spare does not run it again: measured,
    its extra copy-on-write pages cost more than they saved, docs/performance.md.)"""
    global _main, _warmed
    if _warmed:  # the zygote warmed this process's image before forking it (runner/zygote.py)
        return
    body = b"--b\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\n\r\nx\r\n--b--\r\n"
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/function/probe/a/b", "QUERY_STRING": "a=1",
               "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.errors": sys.stderr,
               "CONTENT_TYPE": "multipart/form-data; boundary=b", "CONTENT_LENGTH": str(len(body)),
               "HTTP_COOKIE": "a=b", "wsgi.input": io.BytesIO(body)}
    try:
        _main = _load(WARM_DIR, "probe").main
        _respond(environ, 1 << 20, fresh=False)
        _warmed = True
    finally:
        _main = None
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        while WARM_DIR in sys.path:
            sys.path.remove(WARM_DIR)
        sys.path_importer_cache.pop(WARM_DIR, None)


def answer(call: Callable[[], dict[str, Any] | tuple[dict[str, Any], bytes]]) -> bool:
    """Runs one call and writes its result frame on fd 3, after the function's output is flushed; whether it
    answered with a response (not an error frame). A MemoryError anywhere on the way is the prepared OOM frame."""
    ok = False
    try:
        result = call()
        if isinstance(result, dict):
            data = encode_frame(result)
        else:
            data, ok = encode_frame(result[0]) + result[1], result[0].get("kind") == "response"
    except MemoryError:
        data = OOM_FRAME
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write_all(CHILD_RESULT_FD, data)
    return ok


def main(functions_dir: str, name: str, profile: Profile) -> None:
    """Entry point in the forked, sandboxed child. Never returns."""
    tempfile.tempdir = None  # TMPDIR was just changed to the call's scratch dir
    # stdout is a pipe, so block-buffered: a print() before a timeout, a crash or os._exit() would die in the
    # buffer and never reach the log. Line-buffered, like stderr already is.
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):
        pass
    code = 0
    try:
        answer(lambda: run(functions_dir, name, profile))
        # Closing every pipe tells the gateway the answer is complete now, before the exit and reaping of this
        # process (several ms for a forked interpreter) that nobody needs to wait for.
        os.closerange(0, CHILD_RESULT_FD + 1)
    except BaseException:
        code = outcomes.ExitCode.RUNNER_FAILED  # the gateway reports the call as crashed
    os._exit(code)
