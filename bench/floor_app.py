"""Fork floor: the cheapest possible fresh process per call, with no sandbox and no supervisor.

The same Flask app as the seed, but each request forks the warm Gunicorn worker; the child imports the
function (the worker never does, so every call imports it afresh, as fnbox's children do), runs
``main(request)`` on the request the worker already parsed, writes status, headers and body to a pipe and
exits. The worker reads the pipe to its end and reaps the child. Nothing limits or isolates the child: this is
the floor a fresh-process design cannot go under on this machine, and fnbox is measured against it.
Run it like the seed baseline: ``gunicorn --chdir <dir holding the functions package> ... floor_app:app``.
"""

import importlib
import json
import os

from flask import Flask, Response, make_response, request

app = Flask(__name__)
FUNCTION_DIR = "functions"


def _child(func_name: str, subpath: str, w: int) -> None:
    try:
        mod = importlib.import_module(f"{FUNCTION_DIR}.{func_name}")
        request.view_args["subpath"] = subpath
        resp = make_response(mod.main(request))
        body = resp.get_data()
        head = json.dumps({"status": resp.status_code, "headers": list(resp.headers.items())}).encode()
        out = len(head).to_bytes(4, "big") + head + body
        view = memoryview(out)
        while view:
            view = view[os.write(w, view):]
        code = 0
    except BaseException as e:  # the child must never return into the worker's code
        try:
            os.write(2, f"floor child: {e!r}\n".encode())
        finally:
            code = 1
    os._exit(code)


@app.route("/function/<func_name>", defaults={"subpath": ""}, methods=["GET", "POST"])
@app.route("/function/<func_name>/<path:subpath>", methods=["GET", "POST"])
def run_function(func_name: str, subpath: str) -> Response:
    request.get_data()  # read the body in the parent, as a gateway must before it hands the call over
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(func_name, subpath, w)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if status != 0 or len(data) < 4:
        return Response(f"Error: child exited with status {status}\n", status=502)
    n = int.from_bytes(data[:4], "big")
    head = json.loads(data[4 : 4 + n])
    headers = [(k, v) for k, v in head["headers"] if k.lower() != "content-length"]
    return Response(data[4 + n :], status=head["status"], headers=headers)

