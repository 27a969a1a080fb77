"""The admin API against a real server: auth, deploys (modules, packages, refused archives), deploys under
load, versions and rollback, delete, and the function listing."""

from __future__ import annotations

import datetime
import io
import json
import os
import tarfile
import threading
import time
import zipfile

import pytest
import requests

from tests.conftest import Server, dedent, server_fixture

TOKEN = "admin-test-token-3f9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

FUNCTIONS = {
    "hello": """
        def main(request):
            return 'hello'
    """,
}
PROFILES = {
    "functions.toml": """
        [limited]
        profile = "strict"
        timeout_s = 1.5
    """,
}


# The harness gives every server its own FNBOX_DATA_DIR (s.data_dir, 0755 outside pytest's 0700 tmp: deployed
# packages are symlinks into it, read by sandbox uids).
server = server_fixture(functions=FUNCTIONS, profiles=PROFILES, workers=2, env={"FNBOX_ADMIN_TOKEN": TOKEN})


# -- helpers -------------------------------------------------------------------------------------------------
def deploy(server: Server, name: str, data: bytes | str, headers: dict[str, str] | None = None) -> requests.Response:
    if isinstance(data, str):
        data = dedent(data).encode()
    return server.request("PUT", f"/admin/functions/{name}", data=data, headers=AUTH if headers is None else headers)


def admin(server: Server, method: str, path: str, **kw) -> requests.Response:
    return server.request(method, "/admin" + path, headers=AUTH, **kw)


def version_source(n: int) -> str:
    return f"VERSION = {n}\n\ndef main(request):\n    return str(VERSION)\n"


def tar_gz(files: dict[str, bytes | str], members: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path, content in files.items():
            raw = dedent(content).encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(path)
            info.size = len(raw)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(raw))
        for info, raw in members:
            tf.addfile(info, io.BytesIO(raw) if raw is not None else None)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes | str], members: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, content in files.items():
            zf.writestr(path, dedent(content).encode() if isinstance(content, str) else content)
        for info, raw in members:
            zf.writestr(info, raw)
    return buf.getvalue()


def tree(path: str) -> set[str]:
    """Every path under a folder (symlinks not followed)."""
    out = set()
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(root, n), path))
    return out


def assert_error(r: requests.Response, status: int, error: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    doc = r.json()
    assert doc["error"] == error, doc
    assert isinstance(doc.get("message"), str) and doc["message"], doc
    return doc


PACKAGE = {
    "__init__.py": """
        from .helper import greet

        def main(request):
            return greet(request.args.get('name', 'package'))
    """,
    "helper.py": """
        def greet(name):
            return f'greetings, {name}'
    """,
}


# -- enabling and auth ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_admin_is_404_without_a_token(make_server):
    s = make_server(functions=FUNCTIONS, env={"FNBOX_ADMIN_TOKEN": ""}).start()
    for method, path in [("GET", "/admin/functions"), ("PUT", "/admin/functions/hello"),
                         ("GET", "/admin/functions/hello/versions"), ("POST", "/admin/functions/hello/rollback"),
                         ("DELETE", "/admin/functions/hello"), ("GET", "/admin/calls/abc"),
                         ("GET", "/admin/functions/hello/calls"), ("GET", "/admin/")]:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {TOKEN}"}):
            r = s.request(method, path, headers=headers, data=b"def main(request):\n    return 'x'\n")
            doc = assert_error(r, 404, "admin_disabled")  # and it says how to turn it on
            assert "FNBOX_ADMIN_TOKEN" in doc["message"]
    # Nothing was deployed or deleted: the hand-placed function still answers as before.
    assert s.get("/function/hello").text == "hello"
    assert not os.path.exists(os.path.join(s.data_dir, "versions", "hello"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"bearer {TOKEN}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"X-Admin-Token": TOKEN},
], ids=lambda h: repr(h)[:40])
def test_missing_or_wrong_token_is_401(server, headers):
    cases = [("GET", "/admin/functions"), ("GET", "/admin/functions/hello/versions"),
             ("POST", "/admin/functions/hello/rollback"), ("DELETE", "/admin/functions/hello"),
             ("GET", "/admin/functions/hello/calls"), ("GET", "/admin/calls/abc"),
             ("PUT", "/admin/functions/hello"), ("PUT", "/admin/functions/authprobe")]
    for method, path in cases:
        r = server.request(method, path, headers=headers, data=b"def main(request):\n    return 'pwned'\n")
        doc = assert_error(r, 401, "unauthorized")
        assert "Bearer" in doc["message"]
    # Refused requests changed nothing.
    assert server.get("/function/hello").text == "hello"
    assert server.get("/function/authprobe").status_code == 404
    assert not os.path.exists(os.path.join(server.data_dir, "versions", "authprobe"))


# -- deploying modules ---------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_deploy_module_is_served_on_the_next_call(server):
    assert server.get("/function/fresh").status_code == 404
    before = time.time()
    r = deploy(server, "fresh", version_source(1))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["function"] == "fresh" and doc["version"] == 1 and doc["kind"] == "module"
    assert doc["size"] == len(version_source(1))
    assert before - 1 <= doc["deployed_at"] <= time.time() + 1
    assert server.get("/function/fresh").text == "1"
    r = deploy(server, "fresh", version_source(2))
    assert r.status_code == 201 and r.json()["version"] == 2
    assert server.get("/function/fresh").text == "2"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["1abc", "_private", "a-b", "a.b", "a%20b", "__init__"])
def test_invalid_name_is_400(server, name):
    before = tree(server.functions_dir)
    r = deploy(server, name, version_source(1))
    doc = assert_error(r, 400, "invalid_name")
    assert doc["function"] == name.replace("%20", " ")
    assert tree(server.functions_dir) == before


@pytest.mark.timeout(30)
def test_syntax_error_is_422_and_changes_nothing(server):
    assert deploy(server, "stable", version_source(1)).status_code == 201
    fn_before, data_before = tree(server.functions_dir), tree(server.data_dir)
    with open(os.path.join(server.functions_dir, "stable.py"), "rb") as f:
        live_before = f.read()
    r = deploy(server, "stable", "VERSION = 2\n\ndef main(request)\n    return 'broken'\n")
    doc = assert_error(r, 422, "syntax_error")
    assert doc["line"] == 3, doc
    assert doc["function"] == "stable"
    # A package whose submodule does not compile: the line and the file are named.
    bad_pkg = tar_gz({"__init__.py": "from .part import X\ndef main(request):\n    return X\n",
                      "part.py": "X = 1\nY = (\n"})
    doc = assert_error(deploy(server, "stable", bad_pkg), 422, "syntax_error")
    assert doc["file"] == "part.py" and doc["line"] == 2, doc
    # The old version keeps serving; no version, file or folder appeared.
    assert server.get("/function/stable").text == "1"
    assert tree(server.functions_dir) == fn_before
    assert tree(server.data_dir) == data_before
    with open(os.path.join(server.functions_dir, "stable.py"), "rb") as f:
        assert f.read() == live_before
    vs = admin(server, "GET", "/functions/stable/versions").json()
    assert [v["version"] for v in vs["versions"]] == [1] and vs["current"] == 1


# -- packages --------------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt, top", [("zip", ""), ("zip", "mypkg/"), ("tar.gz", ""), ("tar.gz", "mypkg/"),
                                      ("tar.gz", "./")])
def test_package_deploys_and_runs(server, fmt, top):
    name = f"pkg_{fmt.replace('.', '_')}_{len(top)}"
    files = {top + k: v for k, v in PACKAGE.items()}
    data = zip_bytes(files) if fmt == "zip" else tar_gz(files)
    r = deploy(server, name, data)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "package" and r.json()["version"] == 1
    assert server.get(f"/function/{name}", params={"name": "Ann"}).text == "greetings, Ann"
    assert server.get(f"/function/{name}").text == "greetings, package"


@pytest.mark.timeout(30)
def test_package_files_keep_their_names(server):
    # As `tar -czf pkg.tgz -C pkg .` writes them: "./" prefixes, a dotfile and a data folder.
    files = {
        "./__init__.py": """
            import os
            HERE = os.path.dirname(__file__)

            def main(request):
                with open(os.path.join(HERE, '.settings')) as a, open(os.path.join(HERE, 'data', 'x.txt')) as b:
                    return a.read() + b.read()
        """,
        "./.settings": "dot-",
        "./data/x.txt": "data",
    }
    assert deploy(server, "dotted", tar_gz(files)).status_code == 201
    r = server.get("/function/dotted")
    assert r.status_code == 200 and r.text == "dot-data", r.text


@pytest.mark.timeout(30)
def test_deploy_over_20_mib_is_413(server):
    fn_before, data_before = tree(server.functions_dir), tree(server.data_dir)
    r = deploy(server, "huge", b"#" * (20 * 1024 * 1024 + 1))
    assert_error(r, 413, "request_too_large")
    assert tree(server.functions_dir) == fn_before and tree(server.data_dir) == data_before


@pytest.mark.timeout(30)
def test_module_and_package_replace_each_other(server):
    assert deploy(server, "shape", version_source(1)).status_code == 201
    assert server.get("/function/shape").text == "1"
    assert deploy(server, "shape", zip_bytes(PACKAGE)).status_code == 201
    assert server.get("/function/shape").text == "greetings, package"
    assert deploy(server, "shape", version_source(3)).status_code == 201
    assert server.get("/function/shape").text == "3"
    assert admin(server, "POST", "/functions/shape/rollback").json()["current"] == 2
    assert server.get("/function/shape").text == "greetings, package"


def _symlink_tar() -> bytes:
    link = tarfile.TarInfo("secret.py")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/shadow"
    return tar_gz(PACKAGE, [(link, None)])


def _hardlink_tar() -> bytes:
    link = tarfile.TarInfo("hard.py")
    link.type = tarfile.LNKTYPE
    link.linkname = "/etc/shadow"
    return tar_gz(PACKAGE, [(link, None)])


def _symlink_zip() -> bytes:
    info = zipfile.ZipInfo("secret.py")
    info.external_attr = (0o120777 << 16)
    return zip_bytes(PACKAGE, [(info, b"/etc/shadow")])


BIG = 20 * 1024 * 1024 + 1

MALICIOUS = {
    "tar-absolute": lambda: tar_gz({**PACKAGE, "/tmp/fnbox-evil-abs.py": "X = 1\n"}),
    "zip-absolute": lambda: zip_bytes({**PACKAGE, "/tmp/fnbox-evil-abs.py": "X = 1\n"}),
    "tar-dotdot": lambda: tar_gz({**PACKAGE, "../fnbox-evil-dotdot.py": "X = 1\n"}),
    "tar-dotdot-inner": lambda: tar_gz({**PACKAGE, "sub/../../fnbox-evil-dotdot.py": "X = 1\n"}),
    "zip-dotdot": lambda: zip_bytes({**PACKAGE, "../fnbox-evil-dotdot.py": "X = 1\n"}),
    "tar-symlink": _symlink_tar,
    "tar-hardlink": _hardlink_tar,
    "zip-symlink": _symlink_zip,
    "tar-too-large": lambda: tar_gz({**PACKAGE, "big.bin": b"\0" * BIG}),
    "zip-too-large": lambda: zip_bytes({**PACKAGE, "big.bin": b"\0" * BIG}),
    "tar-too-large-in-parts": lambda: tar_gz({**PACKAGE, **{f"part{i}.bin": b"\0" * (BIG // 3 + 1)
                                                             for i in range(3)}}),
    "tar-no-init": lambda: tar_gz({"helper.py": PACKAGE["helper.py"]}),
    "zip-no-init": lambda: zip_bytes({"pkg/helper.py": PACKAGE["helper.py"]}),
    "zip-init-too-deep": lambda: zip_bytes({"a/b/__init__.py": PACKAGE["__init__.py"]}),
    "not-an-archive-gz": lambda: b"\x1f\x8b" + b"garbage" * 10,
    "not-an-archive-zip": lambda: b"PK\x03\x04" + b"garbage" * 10,
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_malicious_archive_is_refused_with_nothing_written(server, kind):
    name = "evil_" + kind.replace("-", "_")
    fn_before, data_before = tree(server.functions_dir), tree(server.data_dir)
    r = deploy(server, name, MALICIOUS[kind]())
    doc = assert_error(r, 422, "invalid_archive")
    assert doc["function"] == name
    assert tree(server.functions_dir) == fn_before
    assert tree(server.data_dir) == data_before
    for escaped in ("/tmp/fnbox-evil-abs.py", "/tmp/fnbox-evil-dotdot.py",
                    os.path.join(os.path.dirname(server.functions_dir), "fnbox-evil-dotdot.py")):
        assert not os.path.exists(escaped)
    assert server.get(f"/function/{name}").status_code == 404


@pytest.mark.timeout(30)
def test_archive_refusal_keeps_the_live_version(server):
    assert deploy(server, "guarded", version_source(1)).status_code == 201
    assert_error(deploy(server, "guarded", _symlink_tar()), 422, "invalid_archive")
    assert server.get("/function/guarded").text == "1"
    assert [v["version"] for v in admin(server, "GET", "/functions/guarded/versions").json()["versions"]] == [1]


# -- deploys under load --------------------------------------------------------------------------------------
def _hammer(server: Server, name: str, stop: threading.Event, out: list) -> None:
    with requests.Session() as s:
        while not stop.is_set():
            r = s.get(f"{server.url}/function/{name}", timeout=30)
            out.append((r.status_code, r.text))


@pytest.mark.timeout(60)
def test_deploys_under_load_never_fail_a_call(server):
    assert deploy(server, "loadmod", version_source(1)).status_code == 201
    stop = threading.Event()
    results: list[list] = [[] for _ in range(3)]
    threads = [threading.Thread(target=_hammer, args=(server, "loadmod", stop, out)) for out in results]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        for n in range(2, 12):  # ten deploys
            r = deploy(server, "loadmod", version_source(n))
            assert r.status_code == 201 and r.json()["version"] == n, r.text
            # served on the next call
            assert server.get("/function/loadmod").text == str(n)
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    valid = {str(n) for n in range(1, 12)}
    total = 0
    for out in results:
        assert out, "a load thread made no call"
        bad = [(st, body) for st, body in out if st != 200 or body not in valid]
        assert not bad, bad[:5]
        seen = [int(body) for _, body in out]
        assert seen == sorted(seen), "a sequential caller saw an older version after a newer one"
        total += len(out)
    distinct = {body for out in results for _, body in out}
    assert len(distinct) >= 5, f"the calls did not overlap the deploys ({total} calls saw {sorted(distinct)})"


def _versioned_package(n: int) -> bytes:
    return tar_gz({
        "__init__.py": f"""
            import time
            INIT = {n}
            time.sleep(0.02)  # widen the window between importing __init__ and its submodule
            from .part import PART

            def main(request):
                return f'{{INIT}}:{{PART}}'
        """,
        "part.py": f"PART = {n}\n",
    })


@pytest.mark.timeout(60)
def test_package_deploys_under_load_are_never_mixed(server):
    assert deploy(server, "loadpkg", _versioned_package(1)).status_code == 201
    stop = threading.Event()
    results: list[list] = [[] for _ in range(4)]
    threads = [threading.Thread(target=_hammer, args=(server, "loadpkg", stop, out)) for out in results]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        for n in range(2, 12):
            r = deploy(server, "loadpkg", _versioned_package(n))
            assert r.status_code == 201 and r.json()["version"] == n, r.text
            assert server.get("/function/loadpkg").text == f"{n}:{n}"
            time.sleep(0.07)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    calls = [x for out in results for x in out]
    assert len(calls) >= 40
    bad = [(st, body) for st, body in calls if st != 200]
    assert not bad, bad[:5]
    mixed = [body for _, body in calls if len(set(body.split(":"))) != 1]
    assert not mixed, f"{len(mixed)} of {len(calls)} calls mixed two versions: {mixed[:5]}"
    assert {int(body.split(":")[0]) for _, body in calls} <= set(range(1, 12))
    assert len({body for _, body in calls}) >= 5


# -- versions, rollback, delete ------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_versions_keep_the_last_ten_and_rollback(server):
    for n in range(1, 13):
        assert deploy(server, "ver", version_source(n)).json()["version"] == n
    r = admin(server, "GET", "/functions/ver/versions")
    assert r.status_code == 200
    doc = r.json()
    assert doc["function"] == "ver" and doc["current"] == 12
    assert [v["version"] for v in doc["versions"]] == list(range(3, 13))
    assert all(v["kind"] == "module" and v["size"] == len(version_source(v["version"])) and v["deployed"]
               for v in doc["versions"])
    on_disk = sorted(int(e) for e in os.listdir(os.path.join(server.data_dir, "versions", "ver")) if e.isdigit())
    assert on_disk == list(range(3, 13))

    r = admin(server, "POST", "/functions/ver/rollback")
    assert r.status_code == 200 and r.json()["current"] == 11
    assert server.get("/function/ver").text == "11"
    assert admin(server, "POST", "/functions/ver/rollback").json()["current"] == 10
    assert server.get("/function/ver").text == "10"
    assert admin(server, "GET", "/functions/ver/versions").json()["current"] == 10

    r = admin(server, "POST", "/functions/ver/rollback", params={"version": 12})
    assert r.status_code == 200 and r.json()["current"] == 12
    assert server.get("/function/ver").text == "12"
    r = admin(server, "POST", "/functions/ver/rollback", params={"version": 3})
    assert r.json()["current"] == 3 and server.get("/function/ver").text == "3"
    # Nothing before the oldest kept version; pruned and unknown versions are 404; junk is 400.
    assert_error(admin(server, "POST", "/functions/ver/rollback"), 404, "no_version")
    assert_error(admin(server, "POST", "/functions/ver/rollback", params={"version": 1}), 404, "no_version")
    assert_error(admin(server, "POST", "/functions/ver/rollback", params={"version": 99}), 404, "no_version")
    assert_error(admin(server, "POST", "/functions/ver/rollback", params={"version": "abc"}), 400, "bad_request")
    assert server.get("/function/ver").text == "3"
    # A new deploy takes the next number, and the history still holds ten versions.
    assert deploy(server, "ver", version_source(13)).json()["version"] == 13
    assert server.get("/function/ver").text == "13"
    doc = admin(server, "GET", "/functions/ver/versions").json()
    assert [v["version"] for v in doc["versions"]] == list(range(4, 14)) and doc["current"] == 13

    assert_error(admin(server, "GET", "/functions/neverdeployed/versions"), 404, "not_found")
    assert_error(admin(server, "POST", "/functions/neverdeployed/rollback"), 404, "no_version")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["module", "package"])
def test_delete_removes_the_function(server, kind):
    name = f"gone_{kind}"
    data = version_source(1) if kind == "module" else zip_bytes(PACKAGE)
    assert deploy(server, name, data).status_code == 201
    assert server.get(f"/function/{name}").status_code == 200
    r = admin(server, "DELETE", f"/functions/{name}")
    assert r.status_code == 200 and r.json() == {"function": name, "deleted": True}
    r = server.get(f"/function/{name}")
    assert_error(r, 404, "not_found")
    assert name not in [f["name"] for f in admin(server, "GET", "/functions").json()["functions"]]
    assert_error(admin(server, "DELETE", f"/functions/{name}"), 404, "not_found")
    # Deploying again brings it back under the next version number.
    r = deploy(server, name, version_source(7))
    assert r.status_code == 201 and r.json()["version"] == 2
    assert server.get(f"/function/{name}").text == "7"


@pytest.mark.timeout(30)
def test_delete_unknown_and_invalid(server):
    assert_error(admin(server, "DELETE", "/functions/nosuchfunction"), 404, "not_found")
    assert_error(admin(server, "DELETE", "/functions/_private"), 400, "invalid_name")


def _fails_when_asked(answer: str) -> str:
    """A function's source that answers `answer`, or raises ValueError when called with ?fail=1."""
    return f"""
        def main(request):
            if request.args.get('fail'):
                raise ValueError('asked to fail')
            return {answer!r}
    """


# -- listing -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_listing_shows_versions_limits_and_call_counts(server):
    r = deploy(server, "limited", _fails_when_asked("limited ok"))
    assert r.status_code == 201
    deployed = r.json()
    for _ in range(3):
        assert server.get("/function/limited").status_code == 200
    for _ in range(2):
        assert server.get("/function/limited?fail=1").status_code == 500
    doc = admin(server, "GET", "/functions").json()
    by_name = {f["name"]: f for f in doc["functions"]}
    f = by_name["limited"]
    assert f["version"] == deployed["version"] == 1
    assert f["deployed_at"] == deployed["deployed"]
    when = datetime.datetime.strptime(f["deployed_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    assert abs(when.timestamp() - time.time()) < 60
    assert f["calls_by_outcome"] == {"ok": 3, "function_error": 2}
    assert f["calls"] == 5 and f["errors"] == 2
    lim = f["limits"]
    assert lim["profile"] == "strict" and lim["timeout_s"] == 1.5 and lim["memory_mb"] == 64
    assert lim["max_concurrency"] == 2 and lim["network"] is False
    # A hand-placed function is listed too, without a deployed version, with the default profile.
    h = by_name["hello"]
    assert h["version"] is None and h["deployed_at"] is None
    assert h["limits"]["profile"] == "default" and h["limits"]["timeout_s"] == 10
    assert json.dumps(doc)  # plain JSON all the way down


def test_every_board_calls_on_one_board_are_its_own_labelled_and_filtered(server):
    """GET /admin/calls without Redis: this board's calls, newest first, each labelled with this board."""
    import socket

    assert deploy(server, "listed", _fails_when_asked("listed ok")).status_code == 201
    t0 = time.time()
    rids = [server.get("/function/listed" + ("?fail=1" if i == 1 else "")).headers["X-Request-Id"] for i in range(3)]
    assert server.get("/function/hello").status_code == 200
    doc = admin(server, "GET", "/calls?function=listed").json()
    board = socket.gethostname()  # FNBOX_BOARD's default
    assert doc["board"] == board and doc["boards"] == [board] and doc["unreachable"] == []
    assert [c["request_id"] for c in doc["calls"]] == rids[::-1]
    assert {c["board"] for c in doc["calls"]} == {board}
    assert [c["outcome"] for c in doc["calls"]] == ["ok", "function_error", "ok"]
    assert "asked to fail" in doc["calls"][1]["message"]
    # Every function without `function`; the filters of the per-function listing, and a few more.
    every = admin(server, "GET", "/calls?limit=1000").json()["calls"]
    assert {"listed", "hello"} <= {c["function"] for c in every}
    assert [c["request_id"] for c in admin(server, "GET", "/calls?function=listed&errors=1").json()["calls"]] == \
        [rids[1]]
    assert len(admin(server, "GET", "/calls?function=listed&outcome=ok").json()["calls"]) == 2
    assert len(admin(server, "GET", "/calls?function=listed&status=500").json()["calls"]) == 1
    assert admin(server, "GET", f"/calls?function=listed&since={time.time() + 60}").json()["calls"] == []
    assert len(admin(server, "GET", f"/calls?function=listed&since={t0 - 1}&limit=2").json()["calls"]) == 2
    page = admin(server, "GET", f"/calls?function=listed&until={doc['calls'][0]['time']!r}").json()["calls"]
    assert [c["request_id"] for c in page] == rids[1::-1]
    assert admin(server, "GET", f"/calls?function=listed&board={board}").json()["calls"] == doc["calls"]
    tail = admin(server, "GET", f"/calls?function=listed&board={board}&after={doc['calls'][-1]['id']}").json()
    assert [c["request_id"] for c in tail["calls"]] == rids[1:]  # a tail: after that row, oldest first
    # The old endpoint is the same listing, for one function.
    old = admin(server, "GET", "/cluster/calls?function=listed").json()
    assert old["function"] == "listed" and old["calls"] == doc["calls"] and old["unreachable"] == []
    assert_error(admin(server, "GET", "/cluster/calls"), 400, "bad_request")
    for bad in ("limit=0", "limit=x", "errors=maybe", "since=yesterday", "until=x", "status=99", "board=a%20b",
                "function=no-such", "after=3", f"after=x&board={board}"):
        assert_error(admin(server, "GET", f"/calls?{bad}"), 400, "bad_request")
    assert "no board named 'elsewhere'" in assert_error(admin(server, "GET", "/calls?board=elsewhere"), 404,
                                                         "not_found")["message"]
    assert_error(admin(server, "GET", "/calls?function=nosuchfunction"), 404, "not_found")
    assert_error(server.get("/admin/calls"), 401, "unauthorized")
