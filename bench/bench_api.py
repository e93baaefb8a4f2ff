"""Control API benchmark: GET /health latency and POST /api/generate-caption round trip
(warm tiny WD model) over the daemon's Unix socket, the daemon's RSS, and a bare
stdlib HTTP server on a Unix socket measured in the same run for comparison.

    .venv/bin/python bench/bench_api.py [--health N] [--captions N]

Prints Markdown (copy the numbers into bench/README.md, section "Control API").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.client import request  # noqa: E402
from tests.daemonproc import DaemonProcess, make_image, wait_for  # noqa: E402
from tests.wdmodel import build_wd_model  # noqa: E402

BARE = r"""
import json, os, socketserver, sys
from http.server import BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"status": "ok", "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
    def address_string(self): return "unix"
class S(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
s = S(sys.argv[1], H)
print("ready", flush=True)
s.serve_forever()
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(sock: Path, method: str, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        code, body = request(sock, method, url, timeout=30)
        out.append((time.perf_counter() - t) * 1000)
        assert code == 200, body
    return out


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"{statistics.median(ms):.2f} ms | {q[98]:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--health", type=int, default=1000)
    ap.add_argument("--captions", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bapi-", dir="/tmp"))
    build_wd_model(work / "model")
    root = work / "data"
    make_image(root / "a.png", "red", size=(512, 512))
    (work / "run").mkdir()
    d = DaemonProcess(work / "run", [root], work / "model", top={"log_level": "info"})
    d.start()
    try:
        wait_for(d.idle, timeout=60)
        pid = d.status()["pid"]
        timed(d.socket, "GET", "/health", 50)  # warm up
        health = timed(d.socket, "GET", "/health", args.health)
        url = "/api/generate-caption/_/a.png?force=true"
        timed(d.socket, "POST", url, 5)
        captions = timed(d.socket, "POST", url, args.captions)
        daemon_rss = rss_mib(pid)
    finally:
        d.stop()
    bare_sock = work / "bare.sock"
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_sock)], stdout=subprocess.PIPE)
    try:
        assert bare.stdout is not None and bare.stdout.readline().strip() == b"ready"
        timed(bare_sock, "GET", "/health", 50)
        bare_health = timed(bare_sock, "GET", "/health", args.health)
        bare_rss = rss_mib(bare.pid)
    finally:
        bare.terminate()
        bare.wait(5)
    print(
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.machine()}; client: daemon.server.request (one connection per request)\n"
    )
    print("| what | requests | median | p99 |")
    print("|---|---|---|---|")
    print(f"| captiond GET /health | {args.health} | {summary(health)} |")
    print(f"| bare stdlib http.server GET /health | {args.health} | {summary(bare_health)} |")
    print(
        f"| captiond POST /api/generate-caption (force, warm tiny WD model, 512x512 PNG) "
        f"| {args.captions} | {summary(captions)} |"
    )
    print()
    print("| process | RSS |")
    print("|---|---|")
    print(f"| captiond (server, worker, watcher, tiny model loaded) | {daemon_rss:.1f} MiB |")
    print(f"| bare stdlib server | {bare_rss:.1f} MiB |")


if __name__ == "__main__":
    main()
