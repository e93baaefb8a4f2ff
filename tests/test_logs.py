import json
import os
import pty
import subprocess
import sys

SNIPPET = (
    "from daemon.logs import configure_logging; import structlog; import sys;"
    "configure_logging('info', sys.argv[1]);"
    "structlog.get_logger().info('caption_written', path='/d/a.png', job_id=7, generator='wd')"
)


def run(fmt: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPET, fmt], capture_output=True, text=True, timeout=30
    )
    return proc.stderr


def test_json_lines_when_stderr_is_not_a_terminal():
    rec = json.loads(run("auto").strip().splitlines()[-1])
    assert rec["event"] == "caption_written"
    assert (rec["path"], rec["job_id"], rec["generator"], rec["level"]) == (
        "/d/a.png",
        7,
        "wd",
        "info",
    )
    assert "timestamp" in rec


def test_console_output_on_a_terminal():
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", SNIPPET, "auto"], stdout=child, stderr=child, close_fds=True
    )
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(30)
    text = out.decode(errors="replace")
    assert "caption_written" in text and "job_id" in text
    assert not text.lstrip().startswith("{")


def test_library_records_are_rendered_once_as_json():
    snippet = (
        "from daemon.logs import configure_logging; import logging;"
        "configure_logging('info', 'json');"
        "from huggingface_hub.utils import logging as hl;"
        "hl.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s')"
    )
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if "Retrying" in line]
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["event"] == "Retrying in 1s" and rec["level"] == "warning"
    assert rec["logger"] == "huggingface_hub.utils._http"
