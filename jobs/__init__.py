"""Queued calls: async invocations, schedules and callbacks, on an embedded SQLite queue or RQ on Redis."""
