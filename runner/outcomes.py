"""The closed set of ways a call can end. The gateway maps each to an HTTP status in one place."""

OK = "ok"
NOT_FOUND = "not_found"
NO_ENTRY_POINT = "no_entry_point"  # the module has no callable entry point (`main`, or the profile's entry_point)
FUNCTION_ERROR = "function_error"
MISSING_DEPENDENCY = "missing_dependency"  # the function imports a package that is not installed
TIMEOUT = "timeout"
MEMORY_LIMIT = "memory_limit"
CRASHED = "crashed"
OUTPUT_LIMIT = "output_limit"
BUSY = "busy"
UNAVAILABLE = "unavailable"

ALL = frozenset(
    {OK, NOT_FOUND, NO_ENTRY_POINT, FUNCTION_ERROR, MISSING_DEPENDENCY, TIMEOUT, MEMORY_LIMIT, CRASHED, OUTPUT_LIMIT,
     BUSY, UNAVAILABLE}
)
# Outcomes whose record carries the exception's type, message and (user-frames) traceback.
WITH_EXCEPTION = frozenset({FUNCTION_ERROR, MISSING_DEPENDENCY})
