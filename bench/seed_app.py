"""Seed baseline: the seed write-up's in-process design, kept as close to the original as possible.

Each call imports ``functions.<name>`` (a no-op after the first import in a worker) and runs ``main(request)``
inside the Gunicorn worker itself: no isolation, no per-call process. It is the upper bound on throughput.
Run it with ``gunicorn --chdir <dir holding the functions package> --pythonpath bench seed_app:app``.
"""

import importlib

from flask import Flask, request

app = Flask(__name__)
FUNCTION_DIR = "functions"


@app.route("/function/<func_name>", defaults={"subpath": ""}, methods=["GET", "POST"])
@app.route("/function/<func_name>/<path:subpath>", methods=["GET", "POST"])
def run_function(func_name: str, subpath: str):
    try:
        mod = importlib.import_module(f"{FUNCTION_DIR}.{func_name}")
        if hasattr(mod, "main"):
            request.view_args["subpath"] = subpath
            return mod.main(request)
        return "Function must define a `main(request)` method", 400
    except Exception as e:  # the seed answers every failure with a 500 carrying the message
        return f"Error: {e}", 500
