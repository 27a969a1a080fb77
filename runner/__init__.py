"""fnbox runner: starts, sandboxes, supervises and reaps one fresh process per function call.

Nothing in this package imports Flask at module level except the child entry point, which needs it to
give the function a real Flask request.
"""
