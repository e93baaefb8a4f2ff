"""Prometheus metrics for ``GET /metrics``.

Event metrics (latencies, failures, captions written) are recorded where they happen
through the module-level objects below; state metrics (jobs by state, resident
models, oldest pending job, watcher events) are read from the daemon at scrape time
by ``DaemonCollector``, so nothing has to be kept in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry(auto_describe=True)

CAPTIONS_WRITTEN = Counter(
    "captiond_captions_written",
    "Sidecars written, by generator.",
    ["generator"],
    registry=REGISTRY,
)
FAILURES = Counter(
    "captiond_failures",
    "Failed job attempts, by generator and error type.",
    ["generator", "error_type"],
    registry=REGISTRY,
)
GENERATION_SECONDS = Histogram(
    "captiond_generation_seconds",
    "Time of one generate() call (a batch), by generator.",
    ["generator"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
IMAGE_SECONDS = Histogram(
    "captiond_image_seconds",
    "Model time per image (batch time / batch size), by generator.",
    ["generator"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)


class DaemonCollector(Collector):
    """Reads the daemon's status at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]]):
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        queue = s.get("queue", {})
        jobs = GaugeMetricFamily(
            "captiond_jobs", "Jobs by generator and state.", labels=["generator", "state"]
        )
        for gen, states in queue.get("by_generator", {}).items():
            for state, n in states.items():
                jobs.add_metric([gen, state], n)
        yield jobs
        outcomes = GaugeMetricFamily(
            "captiond_jobs_done",
            "Finished jobs by generator and outcome (written, caption_exists, ...).",
            labels=["generator", "outcome"],
        )
        for gen, by in queue.get("outcomes", {}).items():
            for outcome, n in by.items():
                outcomes.add_metric([gen, outcome], n)
        yield outcomes
        oldest = GaugeMetricFamily(
            "captiond_oldest_pending_seconds", "Age of the oldest pending job (0 if none)."
        )
        oldest.add_metric([], queue.get("oldest_pending_seconds") or 0.0)
        yield oldest
        resident = GaugeMetricFamily(
            "captiond_model_loaded", "1 when the generator's model is loaded.", labels=["generator"]
        )
        load = GaugeMetricFamily(
            "captiond_model_load_seconds",
            "How long the last successful load took.",
            labels=["generator"],
        )
        for gen, g in s.get("generators", {}).items():
            resident.add_metric([gen], 1.0 if g.get("loaded") else 0.0)
            if g.get("load_seconds") is not None:
                load.add_metric([gen], g["load_seconds"])
        yield resident
        yield load
        events = CounterMetricFamily(
            "captiond_watcher_events", "Filesystem events seen, by watched folder.", labels=["root"]
        )
        alive = GaugeMetricFamily(
            "captiond_watcher_alive",
            "1 when the folder is watched as its mode says (its observer runs; in scan mode, "
            "the periodic scans run).",
            labels=["root", "mode"],
        )
        scans_alive = bool(s.get("scans", {}).get("alive"))
        for root, w in s.get("watchers", {}).items():
            events.add_metric([root], w.get("events_seen", 0))
            ok = scans_alive if w.get("mode") == "scan" else bool(w.get("alive"))
            alive.add_metric([root, str(w.get("mode"))], 1.0 if ok else 0.0)
        yield events
        yield alive
        conditions = GaugeMetricFamily(
            "captiond_condition",
            "1 while a condition of the system pauses a folder or all intake (state), by "
            "kind: disk_full, quota, read_only, stale_handle, unreachable, io_error, vanished.",
            labels=["scope", "kind"],
        )
        since = GaugeMetricFamily(
            "captiond_condition_since_seconds",
            "Unix time a condition began.",
            labels=["scope", "kind"],
        )
        for scope, c in s.get("conditions", {}).items():
            conditions.add_metric([scope, c["kind"]], 1.0)
            since.add_metric([scope, c["kind"]], c["since"])
        yield conditions
        yield since
        held = GaugeMetricFamily(
            "captiond_jobs_failed_by_conditions",
            "Failed or dead jobs whose cause was a condition of the system (revived by a rescan).",
        )
        held.add_metric([], queue.get("failed_by_conditions", 0))
        yield held
        indexed = GaugeMetricFamily("captiond_files_indexed", "Images in the file index.")
        indexed.add_metric([], s.get("files_indexed", 0))
        yield indexed
        stages = CounterMetricFamily(
            "captiond_stage_cpu_seconds",
            "CPU seconds spent per stage of the caption pipeline, all threads.",
            labels=["stage"],
        )
        for stage, seconds in (s.get("worker", {}).get("stage_cpu_seconds") or {}).items():
            stages.add_metric([stage], seconds)
        yield stages


_current: DaemonCollector | None = None


def register_daemon(status: Callable[[], dict[str, Any]]) -> DaemonCollector:
    """Expose one daemon's state (a later call replaces the earlier daemon)."""
    global _current
    if _current is not None:
        REGISTRY.unregister(_current)
    _current = DaemonCollector(status)
    REGISTRY.register(_current)
    return _current


def unregister_daemon(collector: DaemonCollector) -> None:
    """A stopped daemon's state is no longer exposed (its database is closed)."""
    global _current
    if _current is collector:
        REGISTRY.unregister(collector)
        _current = None


def render() -> bytes:
    return generate_latest(REGISTRY)
