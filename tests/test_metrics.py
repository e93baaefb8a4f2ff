from prometheus_client.parser import text_string_to_metric_families

from daemon import metrics

STATUS = {
    "queue": {
        "by_generator": {"wd_tagger": {"pending": 3, "done": 7}},
        "outcomes": {"wd_tagger": {"written": 6, "caption_exists": 1}},
        "oldest_pending_seconds": 12.5,
    },
    "generators": {"wd_tagger": {"loaded": True, "load_seconds": 0.8}, "vlm": {"loaded": False}},
    "watchers": {"pics": {"events_seen": 42, "alive": True, "mode": "inotify"}},
    "files_indexed": 10,
}


def samples() -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_state_metrics_are_read_at_scrape_time():
    state = {"status": STATUS}
    metrics.register_daemon(lambda: state["status"])
    got = samples()
    assert got[("captiond_jobs", (("generator", "wd_tagger"), ("state", "pending")))] == 3
    assert got[("captiond_jobs_done", (("generator", "wd_tagger"), ("outcome", "written")))] == 6
    assert got[("captiond_oldest_pending_seconds", ())] == 12.5
    assert got[("captiond_model_loaded", (("generator", "vlm"),))] == 0
    assert got[("captiond_model_load_seconds", (("generator", "wd_tagger"),))] == 0.8
    assert got[("captiond_watcher_events_total", (("root", "pics"),))] == 42
    assert got[("captiond_files_indexed", ())] == 10
    state["status"] = STATUS | {"files_indexed": 11}
    assert samples()[("captiond_files_indexed", ())] == 11
    metrics.register_daemon(lambda: STATUS)  # replacing the daemon does not raise


def test_event_metrics():
    before = samples().get(
        ("captiond_failures_total", (("error_type", "bad_image"), ("generator", "g"))), 0
    )
    metrics.FAILURES.labels("g", "bad_image").inc()
    metrics.GENERATION_SECONDS.labels("g").observe(0.3)
    got = samples()
    assert (
        got[("captiond_failures_total", (("error_type", "bad_image"), ("generator", "g")))]
        == before + 1
    )
    assert got[("captiond_generation_seconds_count", (("generator", "g"),))] >= 1
