"""The web UI in a real browser (Debian's chromium through selenium) against the real
daemon as a subprocess with the tiny WD model (red image -> "red background").

One daemon and one browser serve the whole module. The browser reaches the Unix
socket through a forwarder, as through ``ssh -L``, and the TCP listener directly.
Screenshots of every page (desktop and phone width) go to ``test-artifacts/web-ui/``
(``CAPTIOND_ARTIFACTS`` moves it); the README's gallery picture is one of them.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.client import request
from tests import browser
from tests.daemonproc import DaemonProcess, make_image, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

if (why := browser.available()) is not None:
    pytest.skip(why, allow_module_level=True)

from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TOKEN = "browser-test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    def __init__(self, d: DaemonProcess, root: Path, fwd: browser.SocketForwarder, port: int):
        self.d, self.root, self.fwd, self.tcp_port = d, root, fwd, port

    @property
    def url(self) -> str:
        return self.fwd.url

    @property
    def tcp_url(self) -> str:
        return f"http://127.0.0.1:{self.tcp_port}"

    def api(self, method: str, url: str, body: Any = None) -> tuple[int, dict]:
        raw = None if body is None else json.dumps(body).encode()
        return request(self.d.socket, method, url, raw, timeout=30)

    def idle(self) -> bool:
        return self.d.idle()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, wd_model_dir: Path):
    work = tmp_path_factory.mktemp("webui")
    root = work / "data"
    make_image(root / "red.png", "red")
    make_image(root / "blue.jpg", "blue", size=(1600, 1200))
    make_image(root / "green.png", "green")
    make_image(root / "white.png", "white")
    make_image(root / "sub" / "deep" / "blue2.jpg", "blue", size=(800, 600))
    make_image(root / "sub" / "red2.jpg", "red", size=(600, 800))
    make_image(root / "edit" / "me.png", "red")
    make_image(root / "regen" / "person.png", "green")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    token = work / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    port = free_port()
    run = work / "run"
    run.mkdir()
    d = DaemonProcess(
        run,
        [root],
        wd_model_dir,
        sections={
            "scan": {"on_start": True},
            "api.tcp": {"enabled": True, "port": port, "token_file": str(token)},
        },
    ).start()
    fwd = browser.SocketForwarder(d.socket)
    s = Site(d, root, fwd, port)
    try:
        wait_for(lambda: d.idle() and d.totals().get("done", 0) >= 8, timeout=60)
        yield s
    finally:
        fwd.close()
        d.stop()
    assert "Traceback" not in d.logs(), d.logs()[-4000:]


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    drv = browser.chrome(tmp_path_factory.mktemp("chrome-profile"))
    try:
        yield drv
    finally:
        drv.quit()
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"web UI screenshots: {browser.ARTIFACTS}")


def wait(driver, predicate, timeout: float = 20.0):
    """Until ``predicate(driver)``; a page replaced meanwhile (a reload) is looked at
    again."""
    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
    ).until(lambda d: predicate(d))


def text_of(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def no_console_errors(driver) -> None:
    """No CSP violation or script error on the page (chromium's console log)."""
    logs = driver.get_log("browser")
    bad = [e for e in logs if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert bad == [], bad


# ------------------------------------------------------------------------- scenarios


def test_overview_counts_change_without_a_reload(site: Site, driver) -> None:
    driver.get_log("browser")
    driver.get(site.url + "/ui/")
    assert driver.title.startswith("Overview")
    wait(
        driver,
        lambda d: (
            "live" in text_of(d, "#live-status")
            and "on" in d.find_element(By.ID, "live-status").get_attribute("class")
        ),
    )
    before = int(text_of(driver, "#count-done").replace(",", ""))
    driver.execute_script("window.__sameDocument = 42;")
    make_image(site.root / "dropped.png", "white")  # a new image, as a person drops one
    wait(driver, lambda d: int(text_of(d, "#count-done").replace(",", "")) > before, 30)
    assert driver.execute_script("return window.__sameDocument") == 42  # never reloaded
    no_console_errors(driver)
    browser.shoot(driver, "overview")


def test_gallery_filters_and_opens_an_image(site: Site, driver) -> None:
    driver.get(site.url + "/ui/gallery")
    tiles = driver.find_elements(By.CSS_SELECTOR, ".tile")
    assert len(tiles) >= 9
    # every thumbnail loaded (the broken image as the placeholder)
    wait(
        driver,
        lambda d: d.execute_script(
            "return [...document.images].filter(i => i.closest('.tile'))"
            ".every(i => i.complete && i.naturalWidth > 0)"
        ),
    )
    browser.shoot(driver, "gallery")
    box = driver.find_element(By.ID, "f-q")
    box.send_keys("blue background")
    box.send_keys(Keys.ENTER)
    wait(driver, lambda d: "q=blue" in d.current_url)
    names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".tile .name")]
    assert sorted(names) == ["blue.jpg", "sub/deep/blue2.jpg"], names
    captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".tile .caption")]
    assert all("blue background" in c for c in captions), captions
    browser.shoot(driver, "gallery-filtered")
    Select(driver.find_element(By.ID, "f-state")).select_by_value("failed")
    driver.find_element(By.ID, "f-q").clear()
    driver.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait(driver, lambda d: "state=failed" in d.current_url)
    assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".tile .name")] == ["broken.png"]
    driver.find_element(By.CSS_SELECTOR, ".tile-link").click()
    wait(driver, lambda d: "/ui/image/data/broken.png" in d.current_url)
    assert "bad_image" in driver.find_element(By.CSS_SELECTOR, ".image-details").text
    assert "state=failed" in driver.current_url  # the filter travels with the image
    no_console_errors(driver)
    browser.shoot(driver, "image-failed")


def test_keyboard_edit_save_and_a_rescan_leaves_it_alone(site: Site, driver) -> None:
    sidecar = site.root / "edit" / "me.txt"
    assert "red background" in sidecar.read_text()
    driver.get(site.url + "/ui/image/data/edit/me.png?folder=data/edit")
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("e")  # edit
    area = driver.switch_to.active_element
    assert area.tag_name == "textarea"
    area.send_keys(Keys.CONTROL, "a")
    area.send_keys("my own words, typed by a person")
    area.send_keys(Keys.CONTROL, Keys.ENTER)  # save
    wait(driver, lambda d: text_of(d, "form[data-editor] .status") == "Saved.")
    assert sidecar.read_text() == "my own words, typed by a person\n"
    browser.shoot(driver, "image-saved")
    # A rescan that re-captions captiond's own captions, and a changed image: the
    # person's caption stays.
    code, body = site.api("POST", "/api/queue/rescan", {"recaption": True})
    assert code == 200 and body["recaption_enqueued"] >= 1  # captiond's own captions
    time.sleep(0.5)
    wait_for(site.idle, timeout=30)
    assert sidecar.read_text() == "my own words, typed by a person\n"
    first = _job(site, "data/edit/me.png")
    make_image(site.root / "edit" / "me.png", "blue")  # new content: a new job runs
    wait_for(lambda: _job(site, "data/edit/me.png")["updated_at"] != first["updated_at"]
             and _job(site, "data/edit/me.png")["state"] == "done", timeout=30)  # fmt: skip
    assert _job(site, "data/edit/me.png")["outcome"] in ("caption_edited", "caption_exists")
    assert sidecar.read_text() == "my own words, typed by a person\n"
    # the review keys: back to the gallery of that folder, Esc leaves the editor
    driver.get(site.url + "/ui/image/data/edit/me.png?folder=data/edit")
    driver.find_element(By.TAG_NAME, "body").send_keys("g")
    wait(driver, lambda d: "/ui/gallery" in d.current_url and "folder=data%2Fedit" in d.current_url)


def _job(site: Site, rel: str) -> dict:
    """The image's wd_tagger job, read from the daemon's database (read-only)."""
    path = str(site.root / rel.split("/", 1)[1])
    uri = f"file:{site.d.state_dir / 'captiond.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        row = conn.execute(
            "SELECT state, outcome, updated_at FROM jobs "
            "WHERE path = ? AND generator = 'wd_tagger'",
            (path,),
        ).fetchone()
    return {} if row is None else {"state": row[0], "outcome": row[1], "updated_at": row[2]}


def test_next_and_previous_follow_the_filter(site: Site, driver) -> None:
    driver.get(site.url + "/ui/image/data/blue.jpg?q=blue+background")
    assert driver.find_elements(By.ID, "prev") == []  # the first match
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    wait(driver, lambda d: "/ui/image/data/sub/deep/blue2.jpg" in d.current_url)
    assert driver.find_elements(By.ID, "next") == []  # the last match
    driver.find_element(By.TAG_NAME, "body").send_keys("k")
    wait(driver, lambda d: "/ui/image/data/blue.jpg" in d.current_url)


def test_regenerate_warns_before_replacing_a_persons_caption(site: Site, driver) -> None:
    sidecar = site.root / "regen" / "person.txt"
    code, _ = site.api("PUT", "/api/caption/data/regen/person.png",
                       {"type": "txt", "caption": "a person wrote this"})  # fmt: skip
    assert code == 200
    driver.get(site.url + "/ui/image/data/regen/person.png")
    warning = driver.find_element(By.CSS_SELECTOR, ".person-warning")
    assert warning.is_displayed() and "person.txt" in warning.text
    driver.find_element(By.TAG_NAME, "body").send_keys("r")  # regenerate, not confirmed
    wait(driver, lambda d: "Tick" in text_of(d, "form[data-regenerate] .status"))
    assert sidecar.read_text() == "a person wrote this\n"
    browser.shoot(driver, "image-regenerate-warning")
    driver.find_element(By.NAME, "replace_person").click()
    driver.execute_script("document.activeElement.blur()")
    driver.find_element(By.TAG_NAME, "body").send_keys("r")
    wait(driver, lambda d: "green background" in sidecar.read_text(), 30)
    wait(
        driver,
        lambda d: (
            "green background"
            in d.find_element(By.CSS_SELECTOR, "form[data-editor] textarea").get_attribute("value")
        ),
        30,
    )
    assert driver.find_element(By.CSS_SELECTOR, ".person-warning").get_attribute("hidden")


def test_regenerate_a_captiond_caption_needs_no_confirmation(site: Site, driver) -> None:
    driver.get(site.url + "/ui/image/data/green.png")  # captiond's caption
    assert not driver.find_element(By.CSS_SELECTOR, ".person-warning").is_displayed()
    before = (site.root / "green.txt").stat().st_mtime_ns
    driver.find_element(By.CSS_SELECTOR, "button[data-regen]").click()
    wait(driver, lambda d: (site.root / "green.txt").stat().st_mtime_ns != before, 30)
    assert "green background" in (site.root / "green.txt").read_text()


def test_tcp_login_with_the_token_and_a_wrong_token_refused(site: Site, driver) -> None:
    driver.delete_all_cookies()
    driver.get(site.tcp_url + "/ui/gallery")
    wait(driver, lambda d: "/ui/login" in d.current_url)
    assert "next=%2Fui%2Fgallery" in driver.current_url
    browser.shoot(driver, "login")
    field = driver.find_element(By.ID, "token")
    field.send_keys("not-the-token-at-all")
    field.send_keys(Keys.ENTER)
    wait(driver, lambda d: d.find_elements(By.ID, "login-error"))
    assert "not the token" in text_of(driver, "#login-error")
    assert not any(c["name"] == "captiond_session" for c in driver.get_cookies())
    driver.get(site.tcp_url + "/ui/")  # still not in
    wait(driver, lambda d: "/ui/login" in d.current_url)
    field = driver.find_element(By.ID, "token")
    field.send_keys(TOKEN)
    field.send_keys(Keys.ENTER)
    wait(driver, lambda d: d.current_url.rstrip("/").endswith("/ui"))
    assert driver.title.startswith("Overview")
    session = next(c for c in driver.get_cookies() if c["name"] == "captiond_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert driver.execute_script("return document.cookie") == ""  # no script reads them
    assert "admin" in text_of(driver, ".who")
    # the API on TCP still wants the bearer header: the cookie opens /ui/ only
    assert "401" in _fetch_status(driver, "/api/queue")
    driver.find_element(By.CSS_SELECTOR, ".who button").click()  # log out
    wait(driver, lambda d: "/ui/login" in d.current_url)
    driver.get(site.tcp_url + "/ui/")
    wait(driver, lambda d: "/ui/login" in d.current_url)


def _fetch_status(driver, url: str) -> str:
    return str(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => done(String(r.status))).catch(e => done(String(e)));",
        url,
    ))  # fmt: skip


class _EvilPage(http.server.BaseHTTPRequestHandler):
    """Another site: a page with a form that posts to captiond by itself."""

    target = ""

    def do_GET(self) -> None:
        body = f"""<!doctype html><html><body>
<form id="f" method="post" action="{self.target}/ui/caption/data/red.png">
<input name="type" value="txt"><input name="caption" value="pwned by another site">
<input name="csrf" value="0000000000000000000000000000000000000000000000000000000000000000">
</form><script>document.getElementById('f').submit();</script></body></html>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_forged_cross_site_post_is_refused(site: Site, driver) -> None:
    sidecar = site.root / "red.txt"
    before = sidecar.read_text()
    driver.get(site.url + "/ui/image/data/red.png")  # the browser has its CSRF cookie
    for host in ("localhost", "127.0.0.1"):  # another site, and another port of this one
        handler = type("Evil", (_EvilPage,), {"target": site.url})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            driver.get(f"http://{host}:{server.server_address[1]}/")
            wait(driver, lambda d: "/ui/caption/" in d.current_url)
            wait(driver, lambda d: "403" in d.title)
            assert "cross-site request refused" in driver.page_source
        finally:
            server.shutdown()
            server.server_close()
        assert sidecar.read_text() == before
    browser.shoot(driver, "csrf-refused")


def test_pages_at_phone_width(site: Site, driver) -> None:
    size = driver.get_window_size()
    driver.set_window_size(390, 844)
    try:
        for name, url in [
            ("phone-overview", "/ui/"),
            ("phone-gallery", "/ui/gallery"),
            ("phone-image", "/ui/image/data/blue.jpg"),
            ("phone-folders", "/ui/folders"),
        ]:
            driver.get(site.url + url)
            time.sleep(0.3)
            width = driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390, f"{url} is {width} px wide at phone width"
            browser.shoot(driver, name)
    finally:
        driver.set_window_size(size["width"], size["height"])


def test_folders_page_counts_and_links(site: Site, driver) -> None:
    driver.get(site.url + "/ui/folders")
    rows = {r.find_element(By.CSS_SELECTOR, "td.name").text.lstrip("▸ "): r
            for r in driver.find_elements(By.CSS_SELECTOR, "table.folders tbody tr")}  # fmt: skip
    assert {"data", "sub", "deep", "edit", "regen"} <= set(rows)
    sub = rows["sub"].find_elements(By.CSS_SELECTOR, "td.num")
    assert sub[0].text == "2"  # images in sub and below
    browser.shoot(driver, "folders")
    rows["deep"].find_element(By.CSS_SELECTOR, "td.name a").click()
    wait(driver, lambda d: "folder=data%2Fsub%2Fdeep" in d.current_url)
    assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".tile .name")] == [
        "sub/deep/blue2.jpg"
    ]


def test_pages_run_their_scripts_under_the_csp_without_errors(site: Site, driver) -> None:
    """Every page's script and style come from the daemon: chromium reports no CSP
    violation or script error, and the scripts ran (the live dot, the key handler)."""
    for url in ("/ui/", "/ui/gallery", "/ui/folders", "/ui/image/data/red.png"):
        driver.get_log("browser")  # what earlier tests left (their 401 and 403 answers)
        driver.get(site.url + url)
        no_console_errors(driver)
    driver.get(site.url + "/ui/")
    wait(driver, lambda d: "on" in d.find_element(By.ID, "live-status").get_attribute("class"))
