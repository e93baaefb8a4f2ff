"""The backfill on a real local Ray (2 CPUs, no dashboard, a small object store, temp
dirs and HOME): 2 actors with the tiny WD model, an actor SIGKILLed mid-batch, the
driver SIGKILLed and run again, the daemon running beside it with new drops, a corrupt
image, an actor whose start fails. After each: exactly-once sidecars, the index and the
queue consistent, no temp files. Skipped without the ``ray`` extra."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from daemon.backfill import cluster  # noqa: E402
from daemon.backfill.driver import Backfill, BackfillOptions, ray_executor  # noqa: E402
from daemon.client import request  # noqa: E402
from tests.backfillkit import Site, check_tag_captions, recolour, tags_site  # noqa: E402
from tests.daemonproc import REPO, DaemonProcess, make_image, wait_for  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One Ray instance for the module, its token and files in temp dirs (never the
    real home directory)."""
    home = tmp_path_factory.mktemp("home")
    temp = Path("/tmp") / f"captiond-ray-{os.getpid()}"  # a short path: Ray's sockets
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_AUTH_MODE")}
    os.environ["HOME"] = str(home)
    os.environ.pop("RAY_AUTH_MODE", None)  # Ray's defaults: token auth, token written
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100_000_000,
        _temp_dir=str(temp),
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield {"home": str(home), "address": ray.get_runtime_context().gcs_address}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _options(**kw: Any) -> BackfillOptions:
    return BackfillOptions(**({"actors": 2, "chunk_size": 8, "batch_size": 4} | kw))


def _run(site: Site, options: BackfillOptions) -> Any:
    bf = Backfill(site.settings(), options)
    return bf.run(make_executor=ray_executor(options))


def test_token_auth_with_defaults_and_the_version_check(local_ray: dict[str, str]) -> None:
    token = Path(local_ray["home"]) / ".ray" / "auth_token"
    assert token.is_file()  # Ray wrote it into the test's HOME, not the real one
    nodes = cluster.check_nodes()
    assert len(nodes) == 1 and nodes[0].facts["code"] and nodes[0].cpus == 2
    assert cluster.plan_actors(nodes, None, 1.0, None) == (2, 0.0)
    with pytest.raises(cluster.ClusterError, match="holds at most 2 actors"):
        cluster.plan_actors(nodes, 3, 1.0, None)
    with pytest.raises(cluster.ClusterError, match="no node can hold an actor"):
        cluster.plan_actors(nodes, None, 1.0, 1.0)


def test_a_hundred_images_through_two_actors_with_a_corrupt_one(
    tmp_path: Path, wd_model_dir: Path, local_ray: dict[str, str]
) -> None:
    site = Site(tmp_path, wd_model_dir)
    site.add(100, folders=5)
    site.add_bad()
    assert site.scan() == 101
    p = _run(site, _options())
    assert p.state == "finished", p.message
    assert p.outcomes == {"written": 100} and dict(p.failures) == {"bad_image": 1}
    assert len(p.actors) == 2 and sum(a["images"] for a in p.actors.values()) == 101
    site.check_exactly_once()


def test_an_actor_sigkilled_mid_batch(
    tmp_path: Path, wd_model_dir: Path, local_ray: dict[str, str]
) -> None:
    """The actor dies after captioning half a chunk; Ray restarts it and retries the
    batch (the feeder gives the token the same chunk): every image once."""
    site = Site(tmp_path, wd_model_dir)
    site.add(48)
    site.scan()
    marker = tmp_path / "kill-once"
    marker.touch()
    p = _run(site, _options(test={"kill_after": 4, "marker": str(marker)}))
    assert not marker.exists() and Path(str(marker) + ".taken").exists()  # it did die
    assert p.state == "finished", p.message
    assert p.outcomes == {"written": 48} and p.done == 48 and p.lost == 0
    site.check_exactly_once()
    assert all(r[2] == 1 for r in site.job_rows().values())  # one attempt each


def _cli(site: Site, home: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = os.environ | {"PYTHONPATH": str(REPO), "HOME": home} | env
    environ.pop("RAY_AUTH_MODE", None)  # Ray's defaults; the token is in HOME
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(site.config), "backfill", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_the_driver_sigkilled_then_run_again(
    tmp_path: Path, wd_model_dir: Path, local_ray: dict[str, str]
) -> None:
    """``captiond backfill`` joins the cluster (token auth with Ray's defaults: the
    token from HOME) and is SIGKILLed after renaming the sidecars of a chunk (the 3rd
    to get there) but before acking them. Its leases stay with it; the command run
    again sees its pid gone, takes them back, and recognises those sidecars as
    captiond's (unchanged, not a person's caption)."""
    site = Site(tmp_path, wd_model_dir)
    site.add(48)
    site.scan()
    args = ("--ray", local_ray["address"], "--actors", "2", "--batch-size", "4",
            "--chunk-size", "8")  # fmt: skip
    proc = _cli(site, local_ray["home"], *args, CAPTIOND_CRASH_AT="after_rename@3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    rows = site.job_rows()
    done = sum(r[0] == "done" for r in rows.values())
    renamed_not_acked = [p for p, r in rows.items() if r[0] == "leased" and
                         Path(p).with_suffix(".txt").exists()]  # fmt: skip
    assert len(renamed_not_acked) >= 8  # that chunk at least (recorders run in parallel)
    proc = _cli(site, local_ray["home"], *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = 48 - done
    assert f"backfill finished: {left} of {left} images" in proc.stdout, proc.stdout
    site.check_exactly_once()
    rows = site.job_rows()
    assert {rows[p][1] for p in renamed_not_acked} == {"unchanged"}
    assert {r[1] for r in rows.values()} == {"written", "unchanged"}


def test_the_daemon_running_beside_it_with_new_drops(
    tmp_path: Path, wd_model_dir: Path, local_ray: dict[str, str]
) -> None:
    """The daemon starts while the backfill holds leases (it must leave them alone)
    and serves new drops meanwhile; both record into one queue and index: every image
    captioned into one sidecar, once."""
    site = Site(tmp_path, wd_model_dir)
    site.add(96)
    site.scan()
    (tmp_path / "d").mkdir()
    daemon = DaemonProcess(tmp_path / "d", [site.root], wd_model_dir)
    daemon.config = site.config  # the same configuration, state and socket
    daemon.socket = tmp_path / "captiond.sock"
    hold = tmp_path / "hold"
    hold.touch()
    opts = _options(chunk_size=4, batch_size=2, test={"hold_while": str(hold)})
    bf = Backfill(site.settings(), opts)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(p=bf.run(make_executor=ray_executor(opts))))
    t.start()
    try:
        db, q, _ = site.open()
        wait_for(lambda: q.leased_by_owner().get(bf.owner, 0) >= 8, timeout=60)
        daemon.start()  # recovers leases at start: its own, not the live backfill's
        assert q.leased_by_owner().get(bf.owner, 0) >= 8
        code, body = request(daemon.socket, "GET", "/api/backfills", timeout=5)
        assert code == 200 and body["runs"][0]["owner"] == bf.owner
        assert body["runs"][0]["state"] == "running" and body["runs"][0]["leased"] >= 8
        assert "backfill running" in subprocess.run(
            [sys.executable, "-m", "daemon", "--config", str(site.config), "status"],
            capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)},
        ).stdout  # fmt: skip
        new = []
        for i in range(12):  # half where the backfill works, half elsewhere
            folder = "d0" if i % 2 else "drops"
            new.append(make_image(site.root / folder / f"new{i:02d}.png", "blue"))
        hold.unlink()
        t.join(90)
        assert not t.is_alive()
        for p in new:
            site.images[p] = "blue"
        wait_for(lambda: daemon.status()["queue"]["totals"]["done"] == 108, timeout=60)
        db.close()
    finally:
        hold.unlink(missing_ok=True)
        daemon.stop()
    p = result["p"]
    assert p.state == "finished", p.message
    by_daemon = len(daemon.events("caption_written"))
    assert by_daemon >= 12  # the backfill took at most the 96 pending when it began
    assert p.outcomes["written"] + by_daemon == 108  # every caption generated once
    site.check_exactly_once()


def test_an_actor_whose_start_fails_stops_the_run(
    tmp_path: Path, wd_model_dir: Path, local_ray: dict[str, str]
) -> None:
    site = Site(tmp_path, wd_model_dir)
    site.add(8)
    site.scan()
    text = site.config.read_text().replace(str(wd_model_dir), str(tmp_path / "no-model"))
    site.config.write_text(text)
    started = time.monotonic()
    p = _run(site, _options(actors=1, start_attempts=1))
    assert time.monotonic() - started < 60
    assert p.state == "failed"
    assert "backfill actor on node" in p.message and "ModelUnavailableError" in p.message
    assert "after 1 attempt:" in p.message and "no-model does not exist" in p.message
    rows = site.job_rows()
    assert all(r[0] == "pending" and r[2] == 0 for r in rows.values())  # nothing lost


def test_a_tags_prompt_on_the_actors(
    tmp_path: Path, wd_model_dir: Path, local_ray: dict[str, str], monkeypatch
) -> None:
    """The rows carry the tagger's recorded caption to the actors (through the feeder,
    across processes); an image changed since it was tagged is left to the daemon."""
    site = tags_site(tmp_path, wd_model_dir, monkeypatch)
    images = site.add(8, folders=2)
    site.scan()
    tagger = Backfill(site.settings(), BackfillOptions(generator="wd_tagger"))
    assert tagger.run().outcomes == {"written": 8}  # in process: only tagecho needs actors
    recolour(site, images[0])
    p = _run(site, _options(generator="tagecho"))
    assert p.state == "finished", p.message
    assert p.outcomes == {"written": 7} and p.waiting == 1 and not p.failures
    check_tag_captions(images[1:])
    assert not images[0].with_suffix(".caption").exists()
