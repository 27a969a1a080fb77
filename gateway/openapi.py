"""The HTTP API as an OpenAPI 3.1 document, served at /admin/openapi.json (tests/test_openapi.py keeps it in step
with the app's routes)."""

from __future__ import annotations

from typing import Any

from runner import outcomes

VERSION = "0.2"


def _error(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ok(description: str, schema: str | dict[str, Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": ref}}}


NAME = {"name": "name", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]{0,63}$"},
        "description": "the function's name: a Python identifier of at most 64 characters, not starting with _"}
AUTH_ERRORS = {"401": _error("`unauthorized`: a missing or wrong `Authorization: Bearer <token>`"),
               "400": _error("`invalid_name` or `bad_request`")}
FUNCTION_METHODS = ["get", "post", "put", "patch", "delete", "options", "head"]


def _invoke(subpath: bool) -> dict[str, Any]:
    params = [{**NAME, "description": "the function's name"}]
    if subpath:
        params.append({"name": "subpath", "in": "path", "required": True, "schema": {"type": "string"},
                       "description": "the rest of the path: request.view_args['subpath']"})
    op = {
        "tags": ["functions"], "security": [], "parameters": params,
        "summary": "Call a function: a fresh sandboxed process runs its entry point with this request",
        "responses": {
            "default": {"description": "whatever the function returns (status, headers and body are its own)"},
            "404": _error("`not_found`: no such function"),
            "405": _error("`method_not_allowed`: a method other than these"),
            "413": _error("`request_too_large`: body over the profile's max_request_kb"),
            "415": _error("`unsupported_media_type`: the function read the body with get_json() and the request "
                          "has no JSON Content-Type"),
            "500": _error("`function_error` (type, message; traceback when the profile says `traceback = true`), "
                          "`no_entry_point`, `missing_dependency`, or `internal_error`"),
            "502": _error("`memory_limit`, `crashed` (exitcode, signal) or `output_limit`"),
            "503": _error("`busy` (Retry-After) or `unavailable`"),
            "504": _error("`timeout`: over timeout_s or cpu_s"),
        },
    }
    return {m: {**op, "operationId": f"invoke_{m}{'_subpath' if subpath else ''}"} for m in FUNCTION_METHODS}


def _enqueue(subpath: bool) -> dict[str, Any]:
    params = [{**NAME, "description": "the function's name"}]
    if subpath:
        params.append({"name": "subpath", "in": "path", "required": True, "schema": {"type": "string"}})
    params.append({"name": "X-Callback-Url", "in": "header", "required": False, "schema": {"type": "string"},
                   "description": "where the result is POSTed when the call ends (an allowed host only)"})
    op = {
        "tags": ["async"], "security": [], "parameters": params,
        "summary": "Queue a call of the function (the same request it would get at /function/...); answer at once",
        "responses": {
            "202": _ok("queued (Location: the status URL)", {"type": "object", "properties": {
                "call_id": {"type": "string"}, "status_url": {"type": "string"}, "status": {"const": "queued"},
                "function": {"type": "string"}}}),
            "400": _error("`callback_not_allowed`"), "404": _error("`not_found`"),
            "413": _error("`request_too_large`"), "503": _error("`busy` (the queue is full) or `unavailable`"),
        },
    }
    return {m: {**op, "operationId": f"enqueue_{m}{'_subpath' if subpath else ''}"}
            for m in ("get", "post", "put", "patch", "delete")}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "fnbox", "version": VERSION,
                 "description": "Functions at /function/<name>; the admin API (deploy, versions, history, "
                                "dependencies) at /admin/, registered only when the server has FNBOX_ADMIN_TOKEN "
                                "(otherwise every /admin/ path answers 404 `admin_disabled`); queued calls at "
                                "/async-function/<name>. Every error is JSON (components.schemas.Error) with a "
                                "stable `error` code. The web console (/console/, docs/console.md) is a browser UI "
                                "with its own sign-in, not part of this API."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the server's FNBOX_ADMIN_TOKEN"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message", "request_id"], "properties": {
                    "error": {"type": "string", "description": "stable code",
                              "examples": sorted(outcomes.ALL - {outcomes.OK})},
                    "message": {"type": "string"}, "function": {"type": ["string", "null"]},
                    "request_id": {"type": "string"}, "type": {"type": "string"}, "traceback": {"type": "string"},
                    "exitcode": {"type": ["integer", "null"]}, "signal": {"type": ["string", "null"]},
                    "line": {"type": ["integer", "null"], "description": "syntax_error: the line"},
                    "file": {"type": "string", "description": "syntax_error: the file"},
                    "output": {"type": "string", "description": "deps_failed: the end of pip's output"}}},
                "Version": {"type": "object", "properties": {
                    "version": {"type": "integer"}, "kind": {"enum": ["module", "package"]},
                    "deployed_at": {"type": "number"}, "deployed": {"type": "string", "format": "date-time"},
                    "size": {"type": "integer"},
                    "origin": {"enum": ["deploy", "hand_edit"], "description": "hand_edit: the functions folder's "
                               "content found changed by hand, kept as a version"}}},
                "Limits": {"type": "object", "description": "the effective profile; `env` values are masked (***)",
                           "additionalProperties": True},
                "Call": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "time": {"type": "number"}, "request_id": {"type": "string"},
                    "function": {"type": "string"}, "version": {"type": ["integer", "null"]},
                    "method": {"type": "string"}, "path": {"type": "string"}, "status": {"type": "integer"},
                    "outcome": {"type": "string"}, "duration_ms": {"type": "number"},
                    "cpu_ms": {"type": ["number", "null"]}, "max_rss_kb": {"type": ["integer", "null"]},
                    "output": {"type": ["string", "null"], "description": "captured stdout/stderr (max_log_kb)"},
                    "error_type": {"type": ["string", "null"], "description": "the exception's type"},
                    "message": {"type": ["string", "null"], "description": "why the call failed (2000 chars max)"},
                    "traceback": {"type": ["string", "null"],
                                  "description": "from the function's own first frame (8000 chars max, the end)"}}},
                "Deps": {"type": "object", "properties": {
                    "requirements": {"type": ["string", "null"], "description": "the functions folder's "
                                     "requirements.txt"},
                    "installed": {"type": "array", "items": {"type": "string"}, "description": "name==version"},
                    "path": {"type": "string"}, "output": {"type": "string", "description": "pip's output (end)"}}},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/function/{name}": _invoke(False),
            "/function/{name}/{subpath}": _invoke(True),
            "/async-function/{name}": _enqueue(False),
            "/async-function/{name}/{subpath}": _enqueue(True),
            "/calls/{call_id}": {"get": {
                "tags": ["async"], "security": [], "operationId": "async_call_status",
                "parameters": [{"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "summary": "An async call's state (queued, running, done, failed), attempts and result",
                "responses": {"200": _ok("the call", {"type": "object", "additionalProperties": True}),
                              "404": _error("`not_found`: unknown, or older than the retention")}}},
            "/admin/queue": {"get": {
                "tags": ["admin", "async"], "operationId": "queue",
                "parameters": [{"name": "state", "in": "query", "schema": {"type": "string"},
                                "description": "only calls in this state"},
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                           "maximum": 1000, "default": 100}}],
                "summary": "Queued, running and finished async calls, with counts by state",
                "responses": {"200": _ok("the queue", {"type": "object", "additionalProperties": True}),
                              **AUTH_ERRORS}}},
            "/admin/queue/{call_id}/requeue": {"post": {
                "tags": ["admin", "async"], "operationId": "requeue",
                "parameters": [{"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "summary": "Queue a failed async call again",
                "responses": {"200": _ok("queued again", {"type": "object", "additionalProperties": True}),
                              "404": _error("`not_found`"), "409": _error("`not_failed`: only failed calls"),
                              **AUTH_ERRORS}}},
            "/admin/calls": {"get": {
                "tags": ["admin"], "operationId": "every_board_calls",
                "parameters": [
                    {"name": "function", "in": "query", "schema": {"type": "string"},
                     "description": "only this function's calls (a name neither a function nor in any history: "
                                    "404)"},
                    {"name": "outcome", "in": "query", "schema": {"type": "string"}, "description": "only this one"},
                    {"name": "errors", "in": "query", "schema": {"enum": ["0", "1"]},
                     "description": "1: only calls that did not end ok"},
                    {"name": "status", "in": "query", "schema": {"type": "integer", "minimum": 100, "maximum": 599}},
                    {"name": "since", "in": "query", "schema": {"type": "number"},
                     "description": "only calls since this unix time"},
                    {"name": "until", "in": "query", "schema": {"type": "number"},
                     "description": "only calls before this unix time (the next page: the last row's time)"},
                    {"name": "board", "in": "query", "schema": {"type": "string"},
                     "description": "only this board's calls (its FNBOX_BOARD); 404 `not_found` for a board "
                                    "that is not registered"},
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0},
                     "description": "with `board`: that board's calls after this row id, oldest first (a tail)"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                                "default": 50}}],
                "summary": "The newest calls of every board (several boards: FNBOX_REDIS_URL; one board: its own), "
                           "newest first, each labelled with its `board`. A board that does not answer within "
                           "FNBOX_BOARD_TIMEOUT_S is left out and named in `unreachable`",
                "responses": {"200": _ok("the calls", {"type": "object", "properties": {
                    "board": {"type": "string", "description": "the board that answered"},
                    "boards": {"type": "array", "items": {"type": "string"},
                               "description": "the boards whose calls are listed"},
                    "unreachable": {"type": "array", "items": {"type": "object", "properties": {
                        "board": {"type": "string"}, "url": {"type": "string"}, "error": {"type": "string"}}}},
                    "registry_error": {"type": "string", "description": "the board registry (Redis) could not "
                                                                       "be read: this board's calls only"},
                    "calls": {"type": "array", "items": {"allOf": [
                        {"$ref": "#/components/schemas/Call"},
                        {"type": "object", "properties": {"board": {"type": "string"}}}]}}}}),
                    "404": _error("`not_found`: no such function or board"),
                    "503": _error("`unavailable`: the history database cannot be read"), **AUTH_ERRORS}}},
            "/admin/cluster/calls": {"get": {
                "tags": ["admin", "async"], "operationId": "cluster_calls", "deprecated": True,
                "parameters": [{"name": "function", "in": "query", "required": True, "schema": {"type": "string"}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                           "maximum": 1000, "default": 50}}],
                "summary": "GET /admin/calls with `function` required (kept for fnbox 0.2's `logs --all-boards`)",
                "responses": {"200": _ok("the calls", {"type": "object", "additionalProperties": True}),
                              "400": _error("`bad_request`"), **AUTH_ERRORS}}},
            "/admin/schedules": {"get": {
                "tags": ["admin", "async"], "operationId": "schedules",
                "summary": "Every scheduled function and its next runs (profiles' schedule keys)",
                "responses": {"200": _ok("schedules", {"type": "object", "additionalProperties": True}),
                              **AUTH_ERRORS}}},
            "/healthz": {"get": {"tags": ["operations"], "security": [], "operationId": "healthz",
                                 "summary": "The fork server, the sandbox layers, the profiles and this worker's "
                                            "history writer (dropped rows, write errors)",
                                 "responses": {"200": {"description": "healthy"},
                                               "503": {"description": "no function can run"}}}},
            "/metrics": {"get": {"tags": ["operations"], "security": [], "operationId": "metrics",
                                 "summary": "Prometheus metrics of every worker",
                                 "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
            "/admin/openapi.json": {"get": {"tags": ["admin"], "security": [], "operationId": "openapi",
                                            "summary": "This document (no token needed: it holds no secret)",
                                            "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/admin/functions": {"get": {
                "tags": ["admin"], "operationId": "list_functions",
                "summary": "Every function: version, origin, limits (env masked), call counts by outcome",
                "responses": {"200": _ok("the functions", {"type": "object", "properties": {"functions": {
                    "type": "array", "items": {"type": "object"}}}}), **AUTH_ERRORS}}},
            "/admin/functions/{name}": {
                "put": {"tags": ["admin"], "operationId": "deploy", "parameters": [NAME],
                        "summary": "Deploy a new version: a module's source, or a .zip / .tar.gz package with "
                                   "__init__.py (at most 20 MiB). A hand edit of the live files is kept as a "
                                   "version first",
                        "requestBody": {"required": True, "content": {"application/octet-stream": {}}},
                        "responses": {"201": _ok("deployed and serving", "Version"),
                                      "413": _error("`request_too_large`"),
                                      "422": _error("`syntax_error` (file, line) or `invalid_archive`"),
                                      **AUTH_ERRORS}},
                "delete": {"tags": ["admin"], "operationId": "delete", "parameters": [NAME],
                           "summary": "Remove the function; its versions stay. Content that was not a version yet "
                                      "(hand-placed, hand-edited) is kept as one (`kept_version`)",
                           "responses": {"200": _ok("removed", {"type": "object", "properties": {
                               "function": {"type": "string"}, "deleted": {"const": True},
                               "kept_version": {"type": "integer"}}}),
                               "404": _error("`not_found`"), **AUTH_ERRORS}}},
            "/admin/functions/{name}/versions": {"get": {
                "tags": ["admin"], "operationId": "versions", "parameters": [NAME],
                "summary": "The kept versions (the last 10) and the current one",
                "responses": {"200": _ok("versions", {"type": "object", "properties": {
                    "function": {"type": "string"}, "current": {"type": ["integer", "null"]},
                    "versions": {"type": "array", "items": {"$ref": "#/components/schemas/Version"}}}}),
                    "404": _error("`not_found`: no deployed versions"), **AUTH_ERRORS}}},
            "/admin/functions/{name}/rollback": {"post": {
                "tags": ["admin"], "operationId": "rollback",
                "parameters": [NAME, {"name": "version", "in": "query", "required": False,
                                      "schema": {"type": "integer", "minimum": 1},
                                      "description": "default: the version before the current one"}],
                "summary": "Serve an earlier (or a given) version again",
                "responses": {"200": _ok("now serving", "Version"),
                              "404": _error("`no_version`"), **AUTH_ERRORS}}},
            "/admin/functions/{name}/calls": {"get": {
                "tags": ["admin"], "operationId": "calls",
                "parameters": [
                    NAME,
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                                "default": 50}},
                    {"name": "outcome", "in": "query", "schema": {"type": "string"}, "description": "only this one"},
                    {"name": "errors", "in": "query", "schema": {"enum": ["0", "1"]},
                     "description": "1: only calls that did not end ok"},
                    {"name": "since", "in": "query", "schema": {"type": "number"},
                     "description": "only calls since this unix time"}],
                "summary": "The function's newest calls first, with output and error details",
                "responses": {"200": _ok("calls", {"type": "object", "properties": {
                    "function": {"type": "string"},
                    "calls": {"type": "array", "items": {"$ref": "#/components/schemas/Call"}}}}),
                    "404": _error("`not_found`: no such function and no call of one"),
                    "503": _error("`unavailable`: the history database cannot be read"), **AUTH_ERRORS}}},
            "/admin/calls/{request_id}": {"get": {
                "tags": ["admin"], "operationId": "call",
                "parameters": [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"},
                                "description": "the call's X-Request-Id"}],
                "summary": "One call's record on this board, with `request` (its headers, credentials redacted) "
                           "when the web console kept them",
                "responses": {"200": _ok("the call", "Call"), "404": _error("`not_found`"), **AUTH_ERRORS}}},
            "/admin/deps": {
                "get": {"tags": ["admin"], "operationId": "deps",
                        "summary": "The functions folder's requirements.txt and the installed packages",
                        "responses": {"200": _ok("dependencies", "Deps"), **AUTH_ERRORS}},
                "put": {"tags": ["admin"], "operationId": "deploy_deps",
                        "summary": "Deploy a requirements.txt (at most 64 KiB) and install it with pip into the "
                                   "data folder; a failed install changes nothing",
                        "requestBody": {"required": True, "content": {"text/plain": {}}},
                        "responses": {"200": _ok("installed", "Deps"),
                                      "413": _error("`request_too_large`"),
                                      "422": _error("`deps_failed`: pip failed (`output`)"), **AUTH_ERRORS}}},
            "/admin/deps/install": {"post": {
                "tags": ["admin"], "operationId": "reinstall_deps",
                "summary": "Install the deployed requirements.txt again (a new release of a package, a rebuilt "
                           "wheel)",
                "responses": {"200": _ok("installed", "Deps"), "404": _error("`not_found`: no requirements.txt"),
                              "422": _error("`deps_failed`"), **AUTH_ERRORS}}},
        },
    }
