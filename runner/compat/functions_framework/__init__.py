"""A small stand-in for Google's `functions_framework` package, for code written for Cloud Functions.

fnbox calls the function itself (one fresh process per call, see runner/child.py), so the decorators only mark
the function: `@functions_framework.http` returns it unchanged, and a module without `main` whose one
decorated function it is runs that function. Installing the real package (`functions-framework` in the
functions folder's requirements.txt) replaces this module. CloudEvent functions are not served by fnbox:
decorating one is allowed (the module imports), calling it answers a function_error that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_http_functions: list[Callable[..., Any]] = []
_cloud_event_functions: list[Callable[..., Any]] = []


def http(func: F) -> F:
    """Marks an HTTP function: it receives the Flask request and returns what a Flask view returns."""
    _http_functions.append(func)
    return func


def cloud_event(func: F) -> F:
    """Marks a CloudEvent function. fnbox serves HTTP functions only: calling this one raises."""
    _cloud_event_functions.append(func)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{func.__name__} is a CloudEvent function; fnbox serves HTTP functions only "
                                  "(decorate it with @functions_framework.http and take the request)")

    refuse.__name__, refuse.__module__, refuse.__doc__ = func.__name__, func.__module__, func.__doc__
    return refuse  # type: ignore[return-value]

