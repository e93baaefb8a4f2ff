"""Fuzz the control API from its own OpenAPI description with schemathesis (bounded:
a few examples per operation), through the token-guarded loopback TCP listener of a
real daemon: no answer may be a 5xx, and the daemon must stay healthy."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from daemon.client import request
from tests.daemonproc import DaemonProcess, make_image, wait_for
from tests.deps import require

schemathesis = require("schemathesis", "the test extra")
hypothesis = require("hypothesis", "the test extra")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOKEN = "fuzz-token-0123456789abcdef"
EXAMPLES = 10  # per operation; about 25 operations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_schemathesis_finds_no_server_errors(tmp_path: Path, wd_model_dir: Path) -> None:
    root = tmp_path / "data"
    make_image(root / "a.png", "red")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o600)
    port = free_port()
    (tmp_path / "run").mkdir()
    d = DaemonProcess(
        tmp_path / "run",
        [root],
        wd_model_dir,
        sections={"api.tcp": {"enabled": True, "port": port, "token_file": str(token)}},
    )
    d.start()
    try:
        wait_for(d.idle)
        code, spec = request(d.socket, "GET", "/openapi.json")
        assert code == 200
        schema = schemathesis.openapi.from_dict(spec)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        seen: dict[str, set[int]] = {}
        ops = [r.ok() for r in schema.get_all_operations()]
        assert len(ops) >= 20
        started = time.monotonic()
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
                resp = case.call(base_url=base, headers=headers, timeout=20)
                key = f"{case.method} {case.path}"
                seen.setdefault(key, set()).add(resp.status_code)
                assert resp.status_code < 500, (
                    key,
                    case.formatted_path,
                    case.body,
                    resp.status_code,
                    resp.text[:500],
                )

            run()
        assert time.monotonic() - started < 180
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
