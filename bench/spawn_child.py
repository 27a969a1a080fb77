"""Child of the spawn baseline: one request in as JSON on stdin, one response out as JSON on stdout.

It rebuilds a real Flask request from the message, so functions see the same ``request`` API as under the
seed design (``args``, ``get_json()``, ``view_args['subpath']``), and turns ``main``'s return value into a
response with Flask's own rules (str, dict, tuple, Response).
"""

import base64
import importlib
import json
import os
import sys


def main() -> int:
    message = json.load(sys.stdin.buffer)
    # The gateway runs with --chdir at the directory holding the functions package; running a script puts only
    # the script's own directory on sys.path, so add the inherited working directory explicitly.
    sys.path.insert(0, os.getcwd())

    from flask import Flask, request
    from werkzeug.test import EnvironBuilder

    app = Flask("spawn_child")
    builder = EnvironBuilder(
        path=message["path"],
        method=message["method"],
        query_string=message["query_string"],
        headers=message["headers"],
        data=base64.b64decode(message["body_b64"]),
    )
    try:
        environ = builder.get_environ()
    finally:
        builder.close()

    with app.request_context(environ):
        request.view_args = {"func_name": message["func_name"], "subpath": message["subpath"]}
        try:
            mod = importlib.import_module(f"functions.{message['func_name']}")
            if hasattr(mod, "main"):
                rv = mod.main(request)
            else:
                rv = ("Function must define a `main(request)` method", 400)
        except Exception as e:  # same contract as the seed: any failure becomes a 500 with the message
            rv = (f"Error: {e}", 500)
        response = app.make_response(rv)
        reply = {
            "status": response.status_code,
            "headers": [[k, v] for k, v in response.headers.items()],
            "body_b64": base64.b64encode(response.get_data()).decode("ascii"),
        }
    sys.stdout.write(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
