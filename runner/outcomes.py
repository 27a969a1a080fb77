"""The closed set of ways a call can end. The gateway maps each to an HTTP status in one place."""

OK = "ok"
NOT_FOUND = "not_found"
NO_MAIN = "no_main"
FUNCTION_ERROR = "function_error"
TIMEOUT = "timeout"
MEMORY_LIMIT = "memory_limit"
CRASHED = "crashed"
OUTPUT_LIMIT = "output_limit"
BUSY = "busy"
UNAVAILABLE = "unavailable"

ALL = frozenset(
    {OK, NOT_FOUND, NO_MAIN, FUNCTION_ERROR, TIMEOUT, MEMORY_LIMIT, CRASHED, OUTPUT_LIMIT, BUSY, UNAVAILABLE}
)
