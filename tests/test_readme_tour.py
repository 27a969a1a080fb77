"""The README's one-minute tour, run line by line in one shell, in a copy of this checkout, against a real
`make run` on a free port: every command succeeds and prints what the README shows under it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest

from tests.conftest import REPO, free_port


def tour_steps(readme: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ ` line of the tour's sh blocks; a heredoc's lines belong to
    its command."""
    section = readme[readme.index("## A one-minute tour"):readme.index("## Errors")]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.startswith("$ "):
                steps[-1][1].append(line)
                continue
            command = line[2:]
            heredoc = re.search(r"<<'(\w+)'", command)
            if heredoc:
                while lines[i] != heredoc.group(1):
                    command += "\n" + lines[i]
                    i += 1
                command += "\n" + lines[i]
                i += 1
            steps.append((command, []))
    return steps


def test_the_tour_is_parsed_as_a_user_reads_it():
    steps = tour_steps(open(os.path.join(REPO, "README.md")).read())
    commands = [c.split()[0] for c, _ in steps]
    assert commands[:3] == ["export", "make", "make"] and commands[-1] == "make"
    assert ("curl 'http://127.0.0.1:8000/function/hello?name=Tony'", ["Hello Tony!"]) in steps


@pytest.mark.timeout(180)
def test_the_readme_tour_works_line_by_line():
    checkout = tempfile.mkdtemp(prefix="fnbox-tour-", dir="/tmp")
    os.chmod(checkout, 0o755)
    work = os.path.join(checkout, "fnbox")
    # copy2 keeps the mtimes: make sees the venv (linked, not rebuilt) as up to date with requirements.txt.
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", ".venv", "var", "__pycache__", ".pytest_cache",
                                                              ".ruff_cache"))
    os.symlink(os.path.join(REPO, ".venv"), os.path.join(work, ".venv"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FNBOX_", "PROMETHEUS_", "MAKE"))}
    # The one change to the README's lines: the port (8000 may be taken on a test machine).
    env.update(FNBOX_BIND=f"127.0.0.1:{port}", FNBOX_URL=f"http://127.0.0.1:{port}", FNBOX_WORKERS="1",
               FNBOX_THREADS="8",
               # The linked .venv is this checkout's: make must never reinstall it from the copy (an editable
               # install would then point into the copy, removed after the test).
               MAKEFLAGS="-o .venv/.installed -o .venv/bin/python")
    steps = tour_steps(open(os.path.join(work, "README.md")).read())
    script = ["set -u"]
    for n, (command, _) in enumerate(steps):
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        if command.endswith("&") or "make run &" in command:
            command = f"make run > {checkout}/run.log 2>&1 &"  # the server's log, kept apart from the outputs
            script.append(command)
            continue
        script.append(f"{{\n{command}\n}} > {checkout}/out.{n} 2> {checkout}/err.{n}; echo $? > {checkout}/rc.{n}")
    try:
        p = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True,
                           timeout=150)
        assert p.returncode == 0, p.stderr
        for n, (command, expected) in enumerate(steps):
            if "make run &" in command:
                continue
            rc = open(f"{checkout}/rc.{n}").read().strip()
            out = open(f"{checkout}/out.{n}").read()
            err = open(f"{checkout}/err.{n}").read()
            assert rc == "0", (command, out, err, open(f"{checkout}/run.log").read()[-3000:])
            if expected:
                want = [line.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for line in expected]
                assert out.splitlines() == want, (command, out, err)
        assert not os.path.exists(os.path.join(work, "var", "fnbox.pid"))  # make stop stopped it
    finally:
        pidfile = os.path.join(work, "var", "fnbox.pid")
        if os.path.exists(pidfile):
            try:
                os.kill(int(open(pidfile).read()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        shutil.rmtree(checkout, ignore_errors=True)
