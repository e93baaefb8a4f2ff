"""Fuzz the control API from its own OpenAPI description with schemathesis (bounded:
a few examples per operation), through the token-guarded loopback TCP listener of a
real daemon. No answer may be a 5xx; every error answer has the documented shape
``{error, error_type, retryable}``; every answer conforms to the description (status
code, content type, body schema); nothing outside the watched root is read or written
(a canary tree beside the root, reachable through symlinks inside it, keeps its names,
bytes, mtimes, ctimes and atimes); and the daemon stays healthy."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from daemon.client import request
from tests.daemonproc import DaemonProcess, make_image, wait_for
from tests.deps import require

schemathesis = require("schemathesis", "the test extra")
hypothesis = require("hypothesis", "the test extra")
checks = require("schemathesis.specs.openapi.checks", "the test extra")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOKEN = "fuzz-token-0123456789abcdef"
EXAMPLES = 10  # per operation; about 25 operations
DAY_NS = 86_400 * 10**9

# Paths that leave the root, for every operation with a {path} (random paths rarely do)
ATTACKS = [
    "_/../outside/secret.png",
    "_/linkdir/secret.png",
    "_/linkdir/sub/deep.png",
    "_/link.png",
    "data/linkdir/secret.png",
    "_/%2e%2e/outside/secret.png",
    "_/linkdir/../linkdir/secret.png",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_canary(outside: Path) -> tuple[list[Path], dict[str, Any]]:
    """Files and folders outside the root, and what they hold. Their atimes are set a
    day before their mtimes: with relatime (or strictatime) any read or listing moves
    the atime forward."""
    make_image(outside / "secret.png", "red")
    (outside / "secret.txt").write_text("untouched\n")
    make_image(outside / "sub" / "deep.png", "blue")
    (outside / "sub" / "deep.txt").write_text("deep caption\n")
    paths = [outside, outside / "sub", *sorted(p for p in outside.rglob("*") if p.is_file())]
    held = contents(paths)
    for p in paths:
        st = os.stat(p)
        os.utime(p, ns=(st.st_mtime_ns - DAY_NS, st.st_mtime_ns))
    return paths, held


def stats(paths: list[Path]) -> dict[str, tuple[int, ...] | None]:
    """lstat only: reads nothing, lists nothing, moves no atime (None: gone)."""
    out: dict[str, tuple[int, ...] | None] = {}
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[str(p)] = None
            continue
        out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns)
    return out


def contents(paths: list[Path]) -> dict[str, Any]:
    return {
        str(p): sorted(os.listdir(p)) if p.is_dir() else hashlib.sha256(p.read_bytes()).digest()
        for p in paths
    }


def atime_shows_reads(folder: Path) -> bool:
    """Does reading a file move its atime forward on this filesystem (not noatime)?"""
    probe = folder / "probe"
    probe.write_bytes(b"probe")
    st = os.stat(probe)
    os.utime(probe, ns=(st.st_mtime_ns - DAY_NS, st.st_mtime_ns))
    probe.read_bytes()
    moved = os.stat(probe).st_atime_ns != st.st_mtime_ns - DAY_NS
    probe.unlink()
    return moved


def check_error_shape(key: str, resp: Any) -> None:
    """Every 4xx/5xx answer is JSON {error: str, error_type: str, retryable: bool}."""
    if resp.status_code < 400:
        return
    ctype = resp.headers.get("content-type") or [""]  # schemathesis: lower-case, lists
    assert ctype[0].startswith("application/json"), (key, resp.headers)
    body = json.loads(resp.content)
    assert isinstance(body, dict), (key, body)
    assert isinstance(body.get("error"), str) and body["error"], (key, body)
    assert isinstance(body.get("error_type"), str) and body["error_type"], (key, body)
    assert isinstance(body.get("retryable"), bool), (key, body)


def test_schemathesis_finds_no_server_errors(tmp_path: Path, wd_model_dir: Path) -> None:
    root = tmp_path / "data"
    make_image(root / "a.png", "red")
    outside = tmp_path / "outside"
    canary, held = make_canary(outside)
    os.symlink(outside, root / "linkdir")
    os.symlink(outside / "secret.png", root / "link.png")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o600)
    port = free_port()
    (tmp_path / "run").mkdir()
    d = DaemonProcess(
        tmp_path / "run",
        [root],
        wd_model_dir,
        watch={"exclude": ["link.png"]},  # the scanner would caption it (a link it follows)
        sections={"api.tcp": {"enabled": True, "port": port, "token_file": str(token)}},
    )
    d.start()
    try:
        wait_for(d.idle)
        before = stats(canary)
        code, spec = request(d.socket, "GET", "/openapi.json")
        assert code == 200
        schema = schemathesis.openapi.from_dict(spec)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        conformance = [
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
        ]
        seen: dict[str, set[int]] = {}

        def run_case(case: Any) -> None:
            resp = case.call(base_url=base, headers=headers, timeout=20)
            key = f"{case.method} {case.path}"
            seen.setdefault(key, set()).add(resp.status_code)
            where = (key, case.formatted_path, case.body, resp.status_code, resp.text[:500])
            assert resp.status_code < 500, where
            check_error_shape(key, resp)
            if "batch-generate" not in case.path:  # a stream of events, not one document
                case.validate_response(resp, checks=conformance, headers=headers)

        ops = [r.ok() for r in schema.get_all_operations()]
        assert len(ops) >= 20
        for op in ops:

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=op.as_strategy())
            def run(case) -> None:
                run_case(case)

            run()
            if "{path}" in op.path:
                for attack in ATTACKS:
                    extra: dict[str, Any] = {"query": {"force": "true"}}
                    if op.method == "put":
                        extra = {"body": {"type": "txt", "caption": "pwned"}}
                    elif op.method == "delete":
                        extra = {"query": {"caption_type": "txt"}}
                    case = op.Case(path_parameters={"path": attack}, **extra)
                    resp = case.call(base_url=base, headers=headers, timeout=20)
                    assert resp.status_code in (403, 404, 422), (op.path, attack, resp.text)
                    check_error_shape(f"{op.method} {op.path} {attack}", resp)
        assert len(seen) == len(ops)
        # the daemon survived and still works
        assert d.healthy()
        assert request(d.socket, "GET", "/status")[0] == 200
        request(d.socket, "POST", "/api/queue/resume", b"{}")
        code, body = request(
            d.socket, "POST", "/api/generate-caption/_/a.png?force=true", timeout=30
        )
        assert code in (200, 202), body
    finally:
        d.stop()
    # nothing outside the root was written, created, renamed, chmod'ed, listed or read
    after = stats(canary)
    if not atime_shows_reads(tmp_path):
        before = {k: v and v[:4] for k, v in before.items()}  # noatime: compare the rest
        after = {k: v and v[:4] for k, v in after.items()}
    assert after == before
    assert contents(canary) == held
    assert held[str(outside)] == ["secret.png", "secret.txt", "sub"]
