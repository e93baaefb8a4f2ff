"""A real browser for the web UI's tests: Debian's chromium driven by its chromedriver
through selenium, headless, with no network of its own; and a TCP -> Unix socket
forwarder that does what ``ssh -L 8080:/run/captiond/captiond.sock`` does, so the
browser reaches the daemon's socket as a person does."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("CAPTIOND_ARTIFACTS", REPO / "test-artifacts")) / "web-ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# As root chromium needs --no-sandbox; the others keep it from reaching out (this
# machine has no network: refused connections would only slow it down).
CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]


def available() -> str | None:
    """None when a browser can run here, else why not."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "chromium and chromedriver are not installed (make system-deps installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra)"
    return None


def chrome(profile: Path, width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


def shoot(driver, name: str) -> Path:
    """A PNG of the whole page as the browser lays it out (beyond the window's
    height), in ARTIFACTS."""
    import base64

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    m = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    view, content = m["cssLayoutViewport"], m["cssContentSize"]
    clip = {
        "x": 0,
        "y": 0,
        "width": max(view["clientWidth"], content["width"]),
        "height": min(max(view["clientHeight"], content["height"]), 6000),
        "scale": 1,
    }
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


class SocketForwarder:
    """127.0.0.1:<port> -> a Unix socket, one pair of copying threads per connection."""

    def __init__(self, unix_path: Path) -> None:
        self.unix_path = str(unix_path)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="forwarder")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.unix_path)
            except OSError:
                client.close()
                upstream.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
