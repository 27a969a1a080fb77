"""Sleeps 100 ms: an I/O-bound call, so throughput is bounded by concurrency, not by CPU."""

import time


def main(request):
    time.sleep(0.1)
    return "ok"
