"""The seed write-up's hello: ?name=, else the first subpath segment, else World."""


def main(request):
    name = request.args.get("name")
    if not name:
        subpath = request.view_args.get("subpath", "")
        parts = subpath.strip("/").split("/")
        if parts:
            name = parts[0]
    if not name:
        name = "World"
    return f"Hello {name}!"
