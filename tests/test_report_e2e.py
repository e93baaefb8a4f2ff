"""The report against a real daemon (subprocess): the worker's captions are checked
without a report asking, `captiond status` shows the flags, `captiond report` gives
the numbers of the folder, `--html` writes a page that headless Chromium renders (a
screenshot is kept as an artifact), and an admin dismisses a flag."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from daemon.api.routes import endpoints
from daemon.client import request
from daemon.queue import Database, FileIndex
from tests.daemonproc import DaemonProcess, make_image, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ARTIFACTS = Path(os.environ.get("CAPTIOND_ARTIFACTS") or Path(__file__).parent / "artifacts")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root in a container: no sandbox; no background traffic on a closed network.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "daemon", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=180, env=env)  # fmt: skip


@pytest.fixture
def running(tmp_path: Path, wd_model_dir: Path):
    root = tmp_path / "ds"
    make_image(root / "a.png", "red", (96, 64))
    make_image(root / "copy.png", "red", (96, 64))  # the same bytes: an exact duplicate
    make_image(root / "b.png", "blue", (40, 80))
    make_image(root / "sub" / "c.png", "green", (64, 64))
    (root / "broken.png").write_bytes(b"not an image")
    os.utime(root / "broken.png", (1e9, 1e9))
    (tmp_path / "run").mkdir()
    d = DaemonProcess(
        tmp_path / "run",
        [root],
        wd_model_dir,
        watch={"settle_seconds": 0.2, "trigger_word": "sks"},
        sections={"report": {"interval_seconds": 10}},
    )
    d.start()
    wait_for(lambda: d.totals().get("done", 0) == 4 and d.totals().get("failed", 0) == 1,
             timeout=60)  # fmt: skip
    yield d, root
    d.stop()


def test_report_status_html_and_dismiss(running, tmp_path: Path) -> None:
    d, root = running
    # 1. the worker's captions were checked in the background, no report asked for
    db = Database(d.state_dir / "captiond.db")
    try:
        wait_for(lambda: len(FileIndex(db).checked_keys(str(root))) == 4, timeout=30)
    finally:
        db.close()

    # 2. a person writes a caption that is only the trigger word: flagged at once
    body = json.dumps({"type": "txt", "caption": "sks"}).encode()
    code, out = request(d.socket, "PUT", "/api/caption/ds/b.png", body)
    assert code == 200, out
    status = d.status()
    assert status["flags"] == {"open": 1, "dismissed": 0, "by_check": {"empty": 1}}
    text = cli(d.config, "status")
    assert "caption flags: 1 open (empty 1), 0 dismissed" in text.stdout, text.stdout

    # 3. the report's numbers (the pHash pass runs every 10 s in this test)
    def hashed() -> dict:
        r = json.loads(cli(d.config, "report", "--json").stdout)
        return r if r["images"]["near_duplicates"]["hashed"] == 3 else None

    r = wait_for(hashed, timeout=60, interval=1.0)
    cov = r["coverage"]
    assert (cov["images"], cov["captioned"], cov["no_caption"]) == (5, 4, 1)
    assert cov["failed"] == {"failed": {"bad_image": 1}, "dead": {}}
    assert cov["by_person"]["written_through_api"] == 1
    assert r["images"]["exact_duplicates"]["list"] == [
        {"count": 2, "paths": ["ds/a.png", "ds/copy.png"]}
    ]
    sizes = {c["size"]: c["count"] for c in r["images"]["common_sizes"]}
    assert sizes == {"96x64": 2, "40x80": 1, "64x64": 1}
    assert r["images"]["below_resolution"]["count"] == 4
    (trig,) = r["tags"]["trigger"]
    assert (trig["word"], trig["with_trigger"], trig["captioned_images"]) == ("sks", 4, 4)
    assert [(f["path"], f["check"]) for f in r["flags"]["list"]] == [("ds/b.png", "empty")]
    near = r["images"]["near_duplicates"]  # flat colours: pHash cannot tell them apart
    assert (near["too_plain"], near["groups"]) == (3, 0)
    # the tiny tagger's tags follow the mean colour after white padding to a square: the
    # 96x64 red images are too pale for "red background"; b.png's tags are now "sks"
    top = {t["tag"]: t["count"] for t in r["tags"]["top"]}
    assert top == {"no humans": 3, "simple background": 3, "green background": 1}, top

    # a folder of the root, by path and by name
    sub = json.loads(cli(d.config, "report", str(root / "sub"), "--json").stdout)
    assert sub["scope"][0]["folder"] == "sub" and sub["coverage"]["images"] == 1
    assert (
        json.loads(cli(d.config, "report", "ds/sub", "--json").stdout)["coverage"]
        == sub["coverage"]
    )
    bad = cli(d.config, "report", "nope")
    assert bad.returncode == 1 and "no watched root named 'nope'" in bad.stderr
    bad = cli(d.config, "report", "--near-distance", "99")
    assert bad.returncode == 1 and "distance" in bad.stderr
    human = cli(d.config, "report")
    assert human.returncode == 0 and "exact duplicates: 1 groups" in human.stdout

    # 4. the HTML page, rendered by Chromium
    page = tmp_path / "report.html"
    out = cli(d.config, "report", "--html", str(page))
    assert out.returncode == 0, out.stderr
    html = page.read_text()
    assert html.count("<svg") >= 6 and "ds/b.png" in html and "<script" not in html
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make system-deps installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    profile = tmp_path / "chromium-profile"
    res = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         "--window-size=1280,4200", page.as_uri()],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert shot.is_file(), res.stderr
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90,
    ).stdout  # fmt: skip
    for section in ("coverage", "tags", "length", "images", "flags"):
        assert f'id="{section}"' in dom
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 4200)
    colours = img.getcolors(1 << 20) or []
    assert len(colours) > 50  # not a blank page
    bars = sum(n for n, (r_, g_, b_) in colours if abs(r_ - 0x3B) + abs(g_ - 0x6E) +
               abs(b_ - 0xA8) < 30)  # fmt: skip
    assert bars > 2000, "the plots' bars are not on the screenshot"

    # 5. an admin dismisses the flag; it stays dismissed
    out = cli(d.config, "flags", "dismiss", "ds/b.png")
    assert out.returncode == 0 and "1 flags dismissed" in out.stdout, out.stderr
    assert d.status()["flags"] == {"open": 0, "dismissed": 1, "by_check": {}}
    again = cli(d.config, "flags", "dismiss", str(root / "b.png"))
    assert again.returncode == 1 and "no open flag" in again.stderr


def test_the_mutating_report_routes_are_admin_only() -> None:
    class Stub:
        pass

    eps = endpoints(Stub(), status=dict, health=dict, metrics=lambda: (b"", ""))  # type: ignore[arg-type]
    by_route = {(e.method, e.pattern): e for e in eps}
    assert by_route[("POST", "/api/flags/dismiss")].admin
    assert by_route[("POST", "/api/report/refresh")].admin
    assert not by_route[("GET", "/api/report")].admin
