"""Helpers for the console tests: a signed-in HTTP session, and the page's CSRF token."""

from __future__ import annotations

import re

import requests

from tests.conftest import Server

ADMIN_TOKEN = "console-admin-token"
PLAY_TOKEN = "console-play-token"
SECRET_VALUE = "s3cret-value-never-shown"

HELLO = "def main(request):\n    return 'hello v0'\n"
PROFILES = {"functions.toml": f'[hello]\nenv = {{ API_KEY = "{SECRET_VALUE}" }}\n'}


def login_form_token(s: requests.Session, server: Server) -> str:
    r = s.get(server.url + "/console/login", timeout=30)
    assert r.status_code == 200, r.text
    return re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)


def sign_in(server: Server, secret: str = ADMIN_TOKEN) -> tuple[requests.Session, str]:
    """A requests session signed in to the console, and its CSRF token."""
    s = requests.Session()
    tok = login_form_token(s, server)
    r = s.post(server.url + "/console/login", data={"csrf": tok, "secret": secret}, allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text
    page = s.get(server.url + r.headers["Location"], timeout=30)
    assert page.status_code == 200, page.text
    return s, page_csrf(page.text)


def page_csrf(html: str) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert m and m.group(1), "the page has no CSRF token"
    return m.group(1)
