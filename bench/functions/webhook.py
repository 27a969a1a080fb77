"""A webhook that posts an event to a chat service with requests and archives it to AWS with boto3 (two real
libraries such a webhook uses): the imports at the top are most of a fresh call's cost (~0.2 s of CPU here).
It only prepares the chat request; the benchmark never leaves the machine.

boto3 is here because the preload scenario measures what preloading saves against what a fresh process
costs anyway (one fresh call, ~15 ms of CPU on the benchmark VM): with requests alone (~0.1 s) the gain is
bounded near 6-7x (docs/performance.md, The fresh call (v3)). Every fresh call really imports both."""

import boto3
import requests


def main(request):
    text = request.args.get("text", "deploy finished")
    prepared = requests.Request("POST", "https://chat.example.com/hooks/T000/B000", json={"text": text}).prepare()
    assert boto3.session.Session  # the archive client would be built here, only when an event is archived
    return {"method": prepared.method, "url": prepared.url, "bytes": len(prepared.body)}
