"""Spawn baseline: the naive way to isolate calls, one brand-new ``python`` process per HTTP call.

The gateway serialises the request as one JSON message on the child's stdin and returns whatever response
the child writes as JSON on stdout. Every call pays a full interpreter start plus ``import werkzeug`` and
the function import, which is exactly the cost fnbox's design is meant to avoid: the floor fnbox is compared
to.
Run it like the seed baseline: ``gunicorn --chdir <dir holding the functions package> ... spawn_app:app``;
the child finds the functions package through its working directory, inherited from the gateway.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path

from flask import Flask, Response, request

app = Flask(__name__)
CHILD = str(Path(__file__).resolve().with_name("spawn_child.py"))
# Bounded so a wedged child can never pin a gateway thread forever; far above any bench function's runtime.
CHILD_TIMEOUT_S = 30.0


@app.route("/function/<func_name>", defaults={"subpath": ""}, methods=["GET", "POST"])
@app.route("/function/<func_name>/<path:subpath>", methods=["GET", "POST"])
def run_function(func_name: str, subpath: str) -> Response:
    message = {
        "func_name": func_name,
        "subpath": subpath,
        "method": request.method,
        "path": request.path,
        "query_string": request.query_string.decode("latin-1"),
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_b64": base64.b64encode(request.get_data()).decode("ascii"),
    }
    try:
        proc = subprocess.run(
            [sys.executable, CHILD],
            input=json.dumps(message).encode(),
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return Response("Error: function timed out\n", status=504)
    if proc.returncode != 0:
        return Response(f"Error: child exited {proc.returncode}\n", status=502)
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        return Response("Error: child wrote an invalid reply\n", status=502)
    return Response(
        base64.b64decode(reply["body_b64"]),
        status=reply["status"],
        headers=[(k, v) for k, v in reply["headers"] if k.lower() != "content-length"],
    )
