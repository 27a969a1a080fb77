"""The `fnbox` command in a new user's first hour (issue 12): run as a user runs it, against a real server."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from cli.main import build_parser, parse_since
from tests.conftest import Server
from tests.test_cli import TOKEN, fnbox, ok, one_line_error, write

FUNCTIONS = {
    "jsonin": """
        def main(request):
            return {'sum': request.get_json()['a'] + request.get_json()['b']}
    """,
    "upload": """
        def main(request):
            f = request.files['doc']
            return {'name': f.filename, 'size': len(f.read()), 'note': request.form['note'],
                    'thing': request.headers.get('X-Thing')}
    """,
    "boom": """
        def main(request):
            return 1 / 0
    """,
    "handdropped": """
        def main(request):
            return 'by hand'
    """,
}
PROFILES = {"functions.toml": """
    [boom]
    env = { TOKEN_FOR_API = "very-secret-41" }
"""}


@pytest.fixture(scope="module")
def server():
    s = Server(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ADMIN_TOKEN": TOKEN})
    s.start()
    yield s
    s.stop()


# -- fnbox run -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_run_json_prints_the_whole_result(tmp_path):
    path = write(str(tmp_path / "snippet.py"), "def main(request):\n    return {'x': request.args['x']}\n")
    p = fnbox("run", path, "--json", "-q", "x=1")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["outcome"] == "ok" and doc["status"].startswith("200") and json.loads(doc["body"]) == {"x": "1"}
    assert "_waiter" not in doc


@pytest.mark.timeout(60)
def test_run_a_package_folder(tmp_path):
    write(str(tmp_path / "mypkg" / "__init__.py"), "from .words import word\n\ndef main(request):\n    return word()\n")
    write(str(tmp_path / "mypkg" / "words.py"), "def word():\n    return 'from the package'\n")
    out = ok(fnbox("run", str(tmp_path / "mypkg")))
    assert out.rstrip().endswith("body:\nfrom the package")
    p = fnbox("run", str(tmp_path))  # a folder without __init__.py
    one_line_error(p, "__init__.py")


@pytest.mark.timeout(60)
def test_run_with_an_entry_point_and_a_user_traceback(tmp_path):
    path = write(str(tmp_path / "h.py"), "def handler(request):\n    return 'handled'\n\ndef bad(request):\n"
                                         "    return {}['nope']\n")
    assert ok(fnbox("run", path, "--entry-point", "handler")).rstrip().endswith("handled")
    p = fnbox("run", path)
    assert p.returncode == 1 and "outcome:  no_entry_point" in p.stdout
    p = fnbox("run", path, "--entry-point", "bad")
    assert p.returncode == 1 and "KeyError" in p.stdout
    assert "h.py\", line 5, in bad" in p.stdout and "runner/child.py" not in p.stdout


# -- invoke ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_invoke_json_data_form_upload_and_headers(server, tmp_path):
    assert json.loads(ok(fnbox("invoke", "jsonin", "-d", '{"a": 2, "b": 3}', url=server.url))) == {"sum": 5}
    doc = write(str(tmp_path / "report.txt"), "twelve bytes")
    out = ok(fnbox("invoke", "upload", "-F", f"doc=@{doc}", "-F", "note=hi", "-H", "X-Thing: yes", url=server.url))
    assert json.loads(out) == {"name": "report.txt", "size": 12, "note": "hi", "thing": "yes"}
    one_line_error(fnbox("invoke", "upload", "-d", "x", "-F", "a=b", url=server.url), "-d and -F")


# -- deploy, versions, rollback, rm ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_deploy_of_a_dashed_file_suggests_a_name(server, tmp_path):
    path = write(str(tmp_path / "my-func.py"), "def main(request):\n    return 'dashed'\n")
    line = one_line_error(fnbox("deploy", path, url=server.url), "invalid_name", "--name my_func")
    assert "my-func" in line
    ok(fnbox("deploy", path, "--name", "my_func", url=server.url))
    assert server.get("/function/my_func").text == "dashed"


@pytest.mark.timeout(60)
def test_hand_placed_function_rollback_rm_keeps_a_version(server):
    one_line_error(fnbox("rollback", "handdropped", url=server.url), "no deployed versions")
    one_line_error(fnbox("versions", "handdropped", url=server.url), "no deployed versions")
    out = ok(fnbox("rm", "handdropped", url=server.url))
    assert out == "removed handdropped (kept as version 1: `fnbox rollback handdropped` brings it back)\n"
    assert server.get("/function/handdropped").status_code == 404
    assert ok(fnbox("rollback", "handdropped", url=server.url)) == "handdropped now runs version 1\n"
    assert server.get("/function/handdropped").text == "by hand"


@pytest.mark.timeout(60)
def test_a_hand_edit_after_a_deploy_becomes_a_version_and_survives_rollback(server, tmp_path):
    path = write(str(tmp_path / "edited.py"), "def main(request):\n    return 'deployed'\n")
    ok(fnbox("deploy", path, url=server.url))
    server.write_function("edited", "def main(request):\n    return 'edited by hand'\n")
    out = ok(fnbox("versions", "edited", url=server.url))
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows == [["1", "module", rows[0][2], rows[0][3], "deploy"],
                    ["*", "2", "module", rows[1][3], rows[1][4], "hand_edit"]], out
    ls = {f["name"]: f for f in json.loads(ok(fnbox("ls", "--json", url=server.url)))}
    assert ls["edited"]["version"] == 2 and ls["edited"]["origin"] == "hand_edit"
    assert ok(fnbox("rollback", "edited", url=server.url)) == "edited now runs version 1\n"
    assert server.get("/function/edited").text == "deployed"
    assert ok(fnbox("rollback", "edited", "--version", "2", url=server.url)) == "edited now runs version 2\n"
    assert server.get("/function/edited").text == "edited by hand"
    # An edit, then a deploy: the edit is kept as a version before the deploy's.
    server.write_function("edited", "def main(request):\n    return 'second edit'\n")
    out = ok(fnbox("deploy", path, url=server.url))
    assert out.startswith("deployed edited version 4 ")
    versions = json.loads(ok(fnbox("versions", "edited", "--json", url=server.url)))["versions"]
    assert [(v["version"], v["origin"]) for v in versions] == [(1, "deploy"), (2, "hand_edit"), (3, "hand_edit"),
                                                                (4, "deploy")]


@pytest.mark.timeout(60)
def test_a_deploy_over_a_hand_placed_function_keeps_it_as_a_version(server, tmp_path):
    server.write_function("placed", "def main(request):\n    return 'placed by hand'\n")
    path = write(str(tmp_path / "placed.py"), "def main(request):\n    return 'deployed'\n")
    assert ok(fnbox("deploy", path, url=server.url)).startswith("deployed placed version 2 ")
    versions = json.loads(ok(fnbox("versions", "placed", "--json", url=server.url)))["versions"]
    assert [(v["version"], v["origin"]) for v in versions] == [(1, "hand_edit"), (2, "deploy")]
    assert ok(fnbox("rollback", "placed", url=server.url)) == "placed now runs version 1\n"
    assert server.get("/function/placed").text == "placed by hand"
    # The same content as the hand-placed file: nothing to keep, the deploy is version 1.
    server.write_function("same", "def main(request):\n    return 'same'\n")
    path = write(str(tmp_path / "same.py"), "def main(request):\n    return 'same'\n")
    assert ok(fnbox("deploy", path, url=server.url)).startswith("deployed same version 1 ")


# -- logs, limits ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_logs_show_errors_and_filter(server):
    assert server.get("/function/jsonin", json={"a": 1, "b": 1}).status_code == 200
    assert server.get("/function/boom").status_code == 500
    out = ok(fnbox("logs", "boom", url=server.url))
    assert "function_error" in out
    assert "    ! Traceback (most recent call last):" in out
    assert "    ! ZeroDivisionError: division by zero" in out
    assert "runner/child.py" not in out
    out = ok(fnbox("logs", "jsonin", "--errors", url=server.url))
    assert out == ""
    assert ok(fnbox("logs", "jsonin", "--since", "1h", url=server.url)).count(" ok ") >= 1
    assert ok(fnbox("logs", "jsonin", "--since", "2999-01-01", url=server.url)) == ""
    p = fnbox("logs", "nosuchfn", url=server.url)
    assert p.returncode == 1
    one_line_error(p, "not_found", "nosuchfn")


def test_parse_since():
    now = 1_000_000.0
    assert parse_since("90s", now) == now - 90 and parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200 and parse_since("1d", now) == now - 86400
    assert parse_since("2026-12-03T08:00") == time.mktime((2026, 12, 3, 8, 0, 0, 0, 0, -1))


@pytest.mark.timeout(60)
def test_limits_and_ls_never_print_env_values(server):
    for args in (("limits", "boom"), ("limits", "boom", "--json"), ("ls", "--json")):
        out = ok(fnbox(*args, url=server.url))
        assert "very-secret-41" not in out
        assert "TOKEN_FOR_API" in out


# -- check -------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_check_finds_syntax_errors_and_missing_entry_points(tmp_path):
    fdir = tmp_path / "functions"
    write(str(fdir / "__init__.py"), "")
    write(str(fdir / "good.py"), "def main(request):\n    return 'ok'\n")
    write(str(fdir / "broken.py"), "def main(request):\n    return (\n")
    write(str(fdir / "nomain.py"), "def handler(request):\n    return 'x'\n")
    write(str(fdir / "ffstyle.py"), "import functions_framework\n\n@functions_framework.http\n"
                                    "def hello_http(request):\n    return 'hi'\n")
    write(str(fdir / "my-func.py"), "def main(request):\n    return 'x'\n")
    write(str(fdir / "pkg" / "__init__.py"), "from .impl import main\n")
    write(str(fdir / "pkg" / "impl.py"), "def main(request)\n    return 1\n")
    env = {"FNBOX_FUNCTIONS_DIR": str(fdir)}
    p = fnbox("check", extra_env=env)
    assert p.returncode == 1, p.stdout
    problems = sorted(p.stderr.splitlines())
    assert problems == sorted([
        f"{fdir}/broken.py:2: SyntaxError: '(' was never closed",
        f"{fdir}/my-func.py: never served: a function's name is a Python identifier (rename it my_func.py)",
        f"{fdir}/nomain.py:1: no entry point: define `main(request)`; it defines handler(): set entry_point = "
        "\"handler\" for [nomain] in functions.toml",
        f"{fdir}/pkg/impl.py:1: SyntaxError: expected ':'",
    ]), p.stderr
    # With the entry point set in a profile, nomain passes.
    prof = tmp_path / "profiles"
    write(str(prof / "default.toml"), "timeout_s = 5\n")
    write(str(prof / "functions.toml"), "[nomain]\nentry_point = \"handler\"\n")
    p = fnbox("check", "--profiles", str(prof), extra_env=env)
    assert not any("nomain" in line for line in p.stderr.splitlines()), p.stderr
    write(str(prof / "functions.toml"), "[nomain]\nentry_point = \"not valid\"\n")
    p = fnbox("check", "--profiles", str(prof), extra_env=env)
    assert p.returncode == 1
    assert f"{prof}/functions.toml: entry_point: must be the name of a function in the module, not 'not valid'" \
        in p.stderr.splitlines()


# -- the admin API off, --help ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_admin_api_off_says_how_to_turn_it_on(make_server):
    s = make_server(functions={"hello": "def main(request):\n    return 'hi'\n"}).start()
    line = one_line_error(fnbox("ls", url=s.url), "admin_disabled", "FNBOX_ADMIN_TOKEN")
    assert "<html" not in line.lower() and "<!doctype" not in line.lower()


def test_every_option_of_every_command_is_explained():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in [("fnbox", parser), *sub.choices.items()]:
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    text = build_parser().format_help()
    assert "FNBOX_URL" in text and "FNBOX_ADMIN_TOKEN" in text


@pytest.mark.timeout(60)
def test_url_option_after_the_command(server):
    assert "jsonin" in ok(fnbox("ls", "--url", server.url))
