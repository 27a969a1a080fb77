"""Touches what a typical function touches on its request: arguments, JSON, forms, files, cookies, URL."""


def main(request):
    request.get_json(silent=True)
    _ = request.form, request.files, request.cookies, request.url, request.host, request.args
    return {"warm": True}
