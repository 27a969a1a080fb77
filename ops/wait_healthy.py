"""`make wait`: polls http://$FNBOX_BIND/healthz until it answers 200 (or a bound), so that a script or a tour can
run `make run &` and then call the server. Standard library only: it runs before .venv/ exists."""

import os
import sys
import time
import urllib.error
import urllib.request

bind = os.environ.get("FNBOX_BIND", "127.0.0.1:8000")
host, _, port = bind.rpartition(":")
if host in ("", "0.0.0.0", "[::]"):
    host = "127.0.0.1"
url = f"http://{host}:{port}/healthz"
limit = float(os.environ.get("FNBOX_WAIT_S", "600"))  # a first `make run` creates .venv/: minutes on a small board
deadline = time.monotonic() + limit
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status == 200:
                print(f"fnbox: up at http://{host}:{port}/")
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    if time.monotonic() > deadline:
        print(f"fnbox: {url} did not answer within {limit:g} s (is `make run` running? see its output)",
              file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
