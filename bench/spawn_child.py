"""Child of the spawn baseline: one request in as JSON on stdin, one response out as JSON on stdout.

It rebuilds a werkzeug Request from the message (plus the ``view_args`` the seed's functions read), imports
the function module, calls ``main`` and turns the return value into a response following Flask's rules
(str/bytes, dict/list as JSON, (body, status[, headers]) tuples, Response objects). Only werkzeug is imported,
not Flask: that is the cheapest way to hand a function a real request object, so the baseline is not slowed
by anything it does not need.
"""

import base64
import importlib
import json
import os
import sys


def _to_response(rv, response_class):
    """Flask's return-value rules, reduced to what a function in this benchmark can return."""
    status = headers = None
    if isinstance(rv, tuple):
        if len(rv) == 3:
            rv, status, headers = rv
        elif len(rv) == 2 and isinstance(rv[1], (dict, list)):
            rv, headers = rv
        elif len(rv) == 2:
            rv, status = rv
    if isinstance(rv, response_class):
        response = rv
    elif isinstance(rv, (dict, list)):
        # Same serialisation as Flask's default JSON provider outside debug mode.
        body = json.dumps(rv, sort_keys=True, separators=(",", ":")) + "\n"
        response = response_class(body, mimetype="application/json")
    elif isinstance(rv, (str, bytes)):
        response = response_class(rv, mimetype="text/html")
    else:
        response = response_class(f"Error: main returned {type(rv).__name__}", status=500)
    if status is not None:
        response.status_code = int(status)
    if headers:
        response.headers.update(headers)
    return response


def main() -> int:
    message = json.load(sys.stdin.buffer)
    # The gateway runs with --chdir at the directory holding the functions package; running a script puts only
    # the script's own directory on sys.path, so add the inherited working directory explicitly.
    sys.path.insert(0, os.getcwd())

    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request, Response

    builder = EnvironBuilder(
        path=message["path"],
        method=message["method"],
        query_string=message["query_string"],
        headers=message["headers"],
        data=base64.b64decode(message["body_b64"]),
    )
    try:
        request = Request(builder.get_environ())
    finally:
        builder.close()
    request.view_args = {"func_name": message["func_name"], "subpath": message["subpath"]}

    try:
        mod = importlib.import_module(f"functions.{message['func_name']}")
        if hasattr(mod, "main"):
            rv = mod.main(request)
        else:
            rv = ("Function must define a `main(request)` method", 400)
    except Exception as e:  # same contract as the seed: any failure becomes a 500 with the message
        rv = (f"Error: {e}", 500)
    response = _to_response(rv, Response)
    reply = {
        "status": response.status_code,
        "headers": [[k, v] for k, v in response.headers.items()],
        "body_b64": base64.b64encode(response.get_data()).decode("ascii"),
    }
    sys.stdout.write(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
