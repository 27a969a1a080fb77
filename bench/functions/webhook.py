"""A webhook that would post to a chat service with requests (a real library a webhook uses): the import at the top
is most of a fresh call's cost. It only prepares the request; the benchmark never leaves the machine."""

import requests


def main(request):
    text = request.args.get("text", "deploy finished")
    prepared = requests.Request("POST", "https://chat.example.com/hooks/T000/B000", json={"text": text}).prepare()
    return {"method": prepared.method, "url": prepared.url, "bytes": len(prepared.body)}
