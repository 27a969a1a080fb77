"""The closed set of ways a call can end, and the exit codes of the runner's own processes. The gateway maps
each outcome to an HTTP status in one place (gateway/errors.py).

Outcomes are a StrEnum: a member is its string ("ok"), so it travels in JSON and compares with the strings
found in history rows and log lines unchanged. The module-level names are the members, for short imports.
"""

from enum import IntEnum, StrEnum


class Outcome(StrEnum):
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


class ExitCode(IntEnum):
    """Exit statuses of the processes the fork server forks (a call's own code may exit with anything)."""

    OK = 0  # a call that answered; a spare told to stop (its fork server is shutting down)
    RUNNER_FAILED = 70  # EX_SOFTWARE: the runner inside the child failed after the sandbox was entered
    SETUP_FAILED = 71  # EX_OSERR: the sandbox could not be entered (or its fork server died meanwhile)


OK = Outcome.OK
NOT_FOUND = Outcome.NOT_FOUND
NO_ENTRY_POINT = Outcome.NO_ENTRY_POINT
FUNCTION_ERROR = Outcome.FUNCTION_ERROR
MISSING_DEPENDENCY = Outcome.MISSING_DEPENDENCY
TIMEOUT = Outcome.TIMEOUT
MEMORY_LIMIT = Outcome.MEMORY_LIMIT
CRASHED = Outcome.CRASHED
OUTPUT_LIMIT = Outcome.OUTPUT_LIMIT
BUSY = Outcome.BUSY
UNAVAILABLE = Outcome.UNAVAILABLE

ALL = frozenset(Outcome)
# Outcomes whose record carries the exception's type, message and (user-frames) traceback.
WITH_EXCEPTION = frozenset({FUNCTION_ERROR, MISSING_DEPENDENCY})
