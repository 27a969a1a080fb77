"""Which queue this board uses: RQ on Redis when FNBOX_REDIS_URL is set (several boards), else the embedded
SQLite queue in FNBOX_DATA_DIR (one board, nothing to install)."""

from __future__ import annotations

import os
from typing import Any

from jobs.config import JobSettings
from runner.config import Settings


def open_queue(settings: Settings, js: JobSettings) -> Any:
    if js.redis_url:
        from jobs.rq_backend import RedisQueue

        return RedisQueue(js.redis_url, js.queue_max, js.retention_s)
    from jobs.store import SqliteQueue

    os.makedirs(settings.data_dir, mode=0o711, exist_ok=True)
    return SqliteQueue(os.path.join(settings.data_dir, "queue.sqlite3"), js.queue_max)
