"""The console in a real browser (Playwright driving Debian's chromium) against a real fnbox server: sign in,
see a function, edit and deploy it (and see a syntax error at its line), watch a new call arrive in the live
tail, read the call's detail, roll back, run snippets in the playground. Saves a screenshot of each page to
docs/screenshots/."""

from __future__ import annotations

import os
import re
import shutil
import uuid

import playwright.sync_api as playwright
import pytest
import requests

from tests.conftest import REPO, Server
from tests.console_kit import ADMIN_TOKEN, HELLO, PROFILES, SECRET_VALUE

expect = playwright.expect
# Debian's chromium (ops/setup-system.sh installs it); Playwright's own browser downloads are not used.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Screenshots go to a scratch folder; FNBOX_SCREENSHOT_DIR=docs/screenshots refreshes the committed ones.
SHOTS = os.path.join(REPO, os.environ.get("FNBOX_SCREENSHOT_DIR") or "/tmp/fnbox-console-screenshots")


@pytest.fixture(scope="module")
def server():
    s = Server(functions={"hello": HELLO, "add": "def main(request):\n    d = request.get_json()\n"
                          "    return {'sum': d['a'] + d['b']}\n"},
               profiles=PROFILES, env={"FNBOX_ADMIN_TOKEN": ADMIN_TOKEN}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), "chromium is missing: run ops/setup-system.sh as root"
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A browser tab that records every Content-Security-Policy violation and script error."""

    def __init__(self, browser, **ctx) -> None:
        self.ctx = browser.new_context(viewport=ctx.pop("viewport", {"width": 1280, "height": 600}), **ctx)
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(20_000)
        self.problems: list[str] = []
        # Expected 401/422 answers log "Failed to load resource"; anything else logged as an error is a problem.
        self.page.on("console", lambda m: self.problems.append(m.text)
                     if (m.type == "error" and "Failed to load resource" not in m.text)
                     or "Content Security Policy" in m.text else None)
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))

    def shot(self, name: str, full: bool = True) -> None:
        os.makedirs(SHOTS, exist_ok=True)
        self.page.screenshot(path=os.path.join(SHOTS, name + ".png"), full_page=full)

    def close(self) -> None:
        self.ctx.close()


def sign_in(p: Page, server: Server) -> None:
    p.page.goto(server.url + "/console/")
    p.page.fill("#secret", ADMIN_TOKEN)
    p.page.click("button[type=submit]")
    p.page.wait_for_url(re.compile(r"/console/$"))


@pytest.mark.timeout(180)
def test_operator_journey(server, browser):
    p = Page(browser)
    page = p.page
    try:
        # Sign in: the login page first, and a wrong token gets a clear message.
        page.goto(server.url + "/")
        page.wait_for_url(re.compile(r"/console/login"))
        p.shot("login")
        page.fill("#secret", "not-the-token")
        page.click("button[type=submit]")
        assert "not right" in page.inner_text("#login-error")
        page.fill("#secret", ADMIN_TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/console/$"))

        # Functions: both functions with their profile; the filter box narrows the list.
        for i in range(6):  # some traffic, a few errors among it
            requests.get(server.url + "/function/hello", timeout=30)
            requests.post(server.url + "/function/add", json={"a": i, "b": 1} if i % 3 else {"a": i}, timeout=30)
        page.reload()
        assert page.locator("#fn-table a.fn", has_text="hello").is_visible()
        assert page.locator("#fn-table a.fn", has_text="add").is_visible()
        p.shot("functions")
        page.fill("#filter", "hel")
        assert page.locator("#fn-table a.fn", has_text="add").is_hidden()
        page.fill("#filter", "")

        # A function: highlighted source, masked secret.
        page.click("#fn-table a.fn:text-is('hello')")
        page.wait_for_url(re.compile(r"/console/functions/hello$"))
        assert page.locator("#source-view .hl").is_visible()
        assert "hello v0" in page.inner_text("#source-view")
        assert "API_KEY" in page.content() and SECRET_VALUE not in page.content()

        # Edit with a syntax error: 422 shown at its line, nothing deployed.
        page.click("#edit-btn")
        page.fill("#editor", "def main(request):\n    return 'broken\n")
        page.click("#deploy-btn")
        page.wait_for_selector("#deploy-error:not([hidden])")
        assert page.inner_text("#deploy-error").startswith("Line 2: ")
        assert page.inner_text(".editor .gutter .err") == "2"
        assert requests.get(server.url + "/function/hello", timeout=30).text == "hello v0"
        p.shot("function-syntax-error", full=False)

        # Deploy twice: v1 then v2 is live.
        for n in (1, 2):
            if not page.locator("#editor").is_visible():
                page.click("#edit-btn")
            page.fill("#editor", f"def main(request):\n    return 'hello v{n}'\n")
            page.keyboard.press("Control+Enter")
            page.wait_for_url(re.compile(rf"done=deployed&v={n}"))
            assert f"Deployed version {n}" in page.inner_text("#notice")
        assert requests.get(server.url + "/function/hello", timeout=30).text == "hello v2"

        # Invoke form: a real call, its outcome, CPU and memory.
        page.select_option("#inv-method", "GET")
        page.fill("#inv-query", "name=Ann")
        page.click("#invoke-form button[type=submit]")
        page.wait_for_selector("#invoke-result:not([hidden])")
        assert page.inner_text("#invoke-result [data-r=outcome]") == "ok"
        assert page.inner_text("#invoke-result [data-r=body]") == "hello v2"
        assert "MiB" in page.inner_text("#invoke-result [data-r=memory]")
        p.shot("function", full=True)

        # Calls: the live tail shows a new call without reloading.
        page.goto(server.url + "/console/calls")
        page.click("#live-btn")
        expect(page.locator("#live-status")).to_have_text(re.compile(r"^Live"))
        rid = uuid.uuid4().hex
        r = requests.get(server.url + "/function/hello?token=abc", timeout=30,
                         headers={"X-Request-Id": rid, "Authorization": "Bearer top-secret",
                                  "Cookie": "sid=cookie-secret"})
        assert r.status_code == 200
        row = page.locator(f'#calls-table a[href="/console/calls/{rid}"]')
        row.wait_for()
        assert page.locator("#calls-table tbody tr").first.get_attribute("data-id") is not None
        p.shot("calls", full=False)

        # A call's detail: request line and headers, secrets redacted.
        row.click()
        page.wait_for_url(re.compile(rf"/console/calls/{rid}$"))
        text = page.inner_text("main")
        assert "GET /function/hello?token=[redacted]" in text
        assert "Authorization: [redacted]" in text and "top-secret" not in text and "cookie-secret" not in text
        assert page.inner_text("#call-outcome") == "ok"
        p.shot("call")

        # Roll back from the function page: one click, v1 is live again; a diff against the live version.
        page.goto(server.url + "/console/functions/hello?diff=1")
        assert "-    return 'hello v1'" in page.inner_text("#diff")
        page.locator(".versions li", has_text="v1").locator("button", has_text="Roll back").click()
        page.wait_for_url(re.compile(r"done=rolledback&v=1"))
        assert "version 1 is live" in page.inner_text("#notice")
        assert requests.get(server.url + "/function/hello", timeout=30).text == "hello v1"

        # Metrics: charts from the history, and the sandbox layers.
        page.goto(server.url + "/console/metrics")
        assert page.locator("svg.chart").count() >= 2
        assert page.locator(".layers li").count() >= 1
        p.shot("metrics", full=True)
        assert not p.problems, p.problems
    finally:
        p.close()


@pytest.mark.timeout(120)
def test_playground_runs_snippets_in_the_strict_sandbox(server, browser):
    p = Page(browser)
    page = p.page
    try:
        sign_in(p, server)
        page.goto(server.url + "/console/playground")
        page.fill("#play-query", "name=Tony")
        page.click("#run-btn")
        page.wait_for_selector("#play-result:not([hidden])")
        assert page.inner_text("#play-result [data-r=outcome]") == "ok"
        assert '"hello": "Tony"' in page.inner_text("#play-result [data-r=body]")
        assert "of 64 MiB" in page.inner_text("#play-result [data-r=memory]")  # the strict profile's limit

        # The timeout example: the run is stopped and the clean error shown; the button shows progress meanwhile.
        page.select_option("#example", "timeout")
        page.click("#run-btn")
        assert page.locator("#run-btn").is_disabled()
        expect(page.locator("#play-result [data-r=outcome]")).to_have_text("timeout", timeout=20_000)
        assert page.inner_text("#play-result [data-r=status]") == "504"
        assert not page.locator("#run-btn").is_disabled()
        p.shot("playground-timeout", full=True)

        # No function was created by running.
        assert requests.get(server.url + "/function/snippet", timeout=30).status_code == 404

        # Save as function deploys it.
        page.select_option("#example", "hello")
        page.fill("#save-name", "from_playground")
        page.click("#save-form button")
        page.wait_for_selector("#save-msg:not([hidden])")
        assert "from_playground v1" in page.inner_text("#save-msg")
        r = requests.get(server.url + "/function/from_playground?name=Ann", timeout=30)
        assert r.json() == {"hello": "Ann"}
        assert not p.problems, p.problems
    finally:
        p.close()


@pytest.mark.timeout(120)
def test_phone_and_dark_mode_and_logout(server, browser):
    phone = Page(browser, viewport={"width": 390, "height": 800}, color_scheme="dark", is_mobile=True,
                 has_touch=True, device_scale_factor=1)
    try:
        sign_in(phone, server)
        # Nothing wider than the screen: no sideways scrolling of the page itself.
        width = phone.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        bg = phone.page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(14, 17, 22)", bg  # the dark palette
        phone.shot("phone-dark-functions", full=False)
        phone.page.goto(server.url + "/console/playground")
        phone.shot("phone-dark-playground", full=False)
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= 390

        # A wide screen in dark mode: the highlighted source stays readable.
        phone.page.set_viewport_size({"width": 1280, "height": 860})
        phone.page.goto(server.url + "/console/functions/hello")
        keyword = phone.page.evaluate("getComputedStyle(document.querySelector('#source-view .k')).color")
        assert keyword != "rgb(0, 112, 32)", keyword  # not the light theme's dark green on a dark background
        phone.shot("function-dark", full=False)
        phone.page.set_viewport_size({"width": 390, "height": 800})

        # Keyboard: "/" focuses the filter on the functions page; sign out works.
        phone.page.goto(server.url + "/console/")
        phone.page.keyboard.press("/")
        assert phone.page.evaluate("document.activeElement.id") == "filter"
        phone.page.click("form.logout button")
        phone.page.wait_for_url(re.compile(r"/console/login"))
        phone.page.goto(server.url + "/console/calls")
        phone.page.wait_for_url(re.compile(r"/console/login"))
        assert not phone.problems, phone.problems
    finally:
        phone.close()
