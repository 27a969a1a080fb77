"""The web console and the playground (docs/console.md), served by the same Gunicorn under /console/.

Off unless FNBOX_ADMIN_TOKEN, FNBOX_CONSOLE_PASSWORD, FNBOX_PLAYGROUND_TOKEN or FNBOX_PLAYGROUND_ALLOW is set:
then every /console/ path is a plain 404, and nothing of it runs per call.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

from flask import Flask, redirect

from gateway.console.config import ConsoleConfig


def register(app: Flask, rt: Any, config: ConsoleConfig | None = None) -> bool:
    """Adds the console to the app when it is configured; returns whether it did."""
    cfg = config or ConsoleConfig.from_env()
    if not cfg.enabled:
        return False
    from gateway.console import api, filters, pages, signin  # noqa: F401  (their routes join the blueprint)
    from gateway.console.blueprint import ConsoleState, bp
    from gateway.console.capture import recorder
    from gateway.console.queries import HistoryReader
    from gateway.console.store import ConsoleStore

    store = ConsoleStore(os.path.join(rt.settings.data_dir, "console.sqlite3"), cfg.session_hours * 3600)
    app.extensions["fnbox_console"] = ConsoleState(cfg, store, HistoryReader(rt.history.path))
    app.register_blueprint(bp)
    app.add_url_rule("/", "console_home", lambda: redirect("/console/"))
    app.after_request(recorder(store, rt.settings.forwarded_allow_ips))
    atexit.register(store.close)
    return True
