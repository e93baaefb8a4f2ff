"""Joining or starting Ray, and the checks before any job is leased: token auth, every
node's captiond version and code, and whether the cluster can place the actors asked for.

Imported only by the ``backfill`` command (it imports Ray)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.backfill.spec import local_facts, version_problem

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_SECONDS = 60.0
CHECK_TIMEOUT_SECONDS = 60.0


class ClusterError(Exception):
    """The cluster cannot run this backfill; the message says why and what to do."""


def token_available() -> bool:
    """A Ray auth token this process would send (environment, file, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    if (p := os.environ.get("RAY_AUTH_TOKEN_PATH")) and Path(p).is_file():
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def prepare_auth(mode: str) -> str:
    """Set ``RAY_AUTH_MODE`` for joining a cluster when it is unset and a token is
    there: without it, Ray 2.60 retries "InvalidAuthToken" against a cluster with token
    auth for ever. A local instance keeps Ray's default (token auth, with a token it
    writes to ~/.ray/auth_token). Returns what was decided, for the log."""
    current = os.environ.get("RAY_AUTH_MODE")
    if current is not None:
        return f"RAY_AUTH_MODE={current} (from the environment)"
    if mode != "local" and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray" in sys.modules:  # Ray read its configuration at import: refresh it
            try:
                from ray._raylet import Config

                Config.initialize("")
            except Exception:  # pragma: no cover - a Ray without it reads the env late
                pass
        return "RAY_AUTH_MODE=token (a token was found)"
    return "Ray's default"


def _with_deadline(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """Run ``fn`` on a thread; ClusterError if it has not returned in ``seconds`` (the
    thread is left behind: the caller exits)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, name="captiond-ray-connect", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise ClusterError(f"{what} did not finish within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def connect(
    ray_address: str,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: str | None = None,
    object_store_memory: int | None = None,
    timeout: float = CONNECT_TIMEOUT_SECONDS,
) -> str:
    """``local`` starts a Ray instance in this process's machine; ``auto`` or an
    address joins a running cluster. Returns a line for the log."""
    auth = prepare_auth(ray_address)  # before Ray reads its configuration
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook) connected already
        return "already connected"
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if ray_address == "local":
        kwargs |= {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if object_store_memory:
            kwargs["object_store_memory"] = object_store_memory
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
    else:
        kwargs = {"address": ray_address, "log_to_driver": False}
    try:
        if ray_address == "local":
            # On this thread: Ray's processes die with the thread that started them
            # (PR_SET_PDEATHSIG); a local start does not wait on a cluster's auth.
            ray.init(**kwargs)
        else:  # joining can retry for ever (auth): on a thread, with a deadline
            _with_deadline(
                lambda: ray.init(**kwargs), timeout, f"connecting to Ray ({ray_address})"
            )
    except ClusterError as exc:
        hint = (
            "is the cluster up (ray status)? With token auth the head's token must be "
            "here: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, and "
            "RAY_AUTH_MODE=token"
        )
        raise ClusterError(f"{exc}: {hint}") from None
    except Exception as exc:
        raise ClusterError(
            f"cannot connect to Ray ({ray_address}): {type(exc).__name__}: {exc}"
        ) from exc
    return f"ray {ray_address}: {auth}"


@dataclass
class NodeInfo:
    node_id: str
    address: str
    cpus: float
    gpus: float
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        host = self.facts.get("host")
        return f"{host} ({self.address})" if host else self.address


def _facts() -> dict[str, str]:
    return local_facts()


def check_nodes(timeout: float = CHECK_TIMEOUT_SECONDS) -> list[NodeInfo]:
    """Every alive node's facts (a tiny task pinned to each); ClusterError naming the
    node when one runs another captiond, Ray or Python, cannot import captiond, or
    does not answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = local_facts()
    nodes = [
        NodeInfo(
            n["NodeID"],
            n.get("NodeManagerAddress", "?"),
            float(n.get("Resources", {}).get("CPU", 0)),
            float(n.get("Resources", {}).get("GPU", 0)),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]
    remote = ray.remote(num_cpus=0, max_retries=0)(_facts)
    refs = {
        n.node_id: remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)
        ).remote()
        for n in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    done = set(ready)
    for n in nodes:
        ref = refs[n.node_id]
        if ref not in done:
            ray.cancel(ref, force=True)
            raise ClusterError(
                f"node {n.label} did not answer the version check within {timeout:.0f} s"
            )
        try:
            n.facts = ray.get(ref)
        except Exception as exc:
            cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            raise ClusterError(
                f"node {n.label} cannot run captiond's check ({cause}); install the same "
                "captiond (with the [ray] extra) on every node"
            ) from None
        if problem := version_problem(expected, n.facts, f"node {n.label}"):
            raise ClusterError(problem)
    return nodes


def placeable(nodes: list[NodeInfo], cpus: float, gpus: float) -> int:
    """How many actors needing ``cpus`` and ``gpus`` the nodes hold at most."""
    total = 0
    for n in nodes:
        by_cpu = int(n.cpus // cpus) if cpus > 0 else 1 << 20
        by_gpu = int(n.gpus // gpus) if gpus > 0 else 1 << 20
        total += min(by_cpu, by_gpu)
    return total


def plan_actors(
    nodes: list[NodeInfo], actors: int | None, cpus: float, gpus: float | None
) -> tuple[int, float]:
    """(actors, GPUs per actor): defaults from the cluster (one actor per GPU when it
    has GPUs, else one per ``cpus``), checked against what the nodes can hold -- a pool
    Ray cannot place waits for ever."""
    total_gpus = sum(n.gpus for n in nodes)
    if gpus is None:
        gpus = 1.0 if total_gpus >= 1 else 0.0
    fit = placeable(nodes, cpus, gpus)
    if fit < 1:
        raise ClusterError(
            f"no node can hold an actor with {cpus:g} CPUs and {gpus:g} GPUs (nodes: "
            + ", ".join(f"{n.label}: {n.cpus:g} CPUs, {n.gpus:g} GPUs" for n in nodes)
            + "); lower --cpus-per-actor / --gpus-per-actor"
        )
    if actors is None:
        actors = fit
    elif actors > fit:
        raise ClusterError(
            f"--actors {actors}: the cluster holds at most {fit} actors with {cpus:g} CPUs "
            f"and {gpus:g} GPUs each"
        )
    return actors, gpus


def node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
