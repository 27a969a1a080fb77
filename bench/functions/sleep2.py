"""Sleeps 2 s: keeps calls in flight long enough to measure the memory each one adds."""

import time


def main(request):
    time.sleep(2)
    return "ok"
