"""remote_vlm against a small OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py):
request shape, concurrency, error typing, breaker and waiting jobs, a server restart
mid-batch, the API key kept out of everything, multi-person with a remote describer,
and ``{tags}`` prompts end to end."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from daemon.config import Settings
from daemon.errors import (
    ErrorType,
    GenerationError,
    GenerationTimeoutError,
    ModelUnavailableError,
    NetworkError,
    classify,
)
from daemon.generators.base import ImageInput
from daemon.generators.registry import Discovered, discover
from daemon.generators.remote_vlm import (
    AnswerCutError,
    RemoteRequestError,
    RemoteVLMConfig,
    RemoteVLMGenerator,
    retry_after_seconds,
)
from daemon.queue import Database, FileIndex, JobQueue
from daemon.residency.breaker import BreakerState
from daemon.residency.manager import NETWORK_WAITS_PER_JOB, ModelManager
from daemon.residency.slot import ModelState
from daemon.worker import Worker
from tests.daemonproc import DaemonProcess, make_image, wait_for
from tests.openai_server import FakeOpenAI, describe_data_url

KEY = "sk-test-5e1f0a9d7c3b4e2a8f6d"


@pytest.fixture
def server():
    with FakeOpenAI() as s:
        yield s


def gen_for(server: FakeOpenAI, **cfg: Any) -> RemoteVLMGenerator:
    config = RemoteVLMConfig(base_url=server.base_url, model="test-vlm", **cfg)
    return RemoteVLMGenerator(config)


def item(gen: RemoteVLMGenerator, colour: str = "red", size=(64, 48), name="a.png", **ctx: str):
    image = Image.new("RGB", size, {"red": (255, 0, 0), "green": (0, 255, 0)}[colour])
    context = {"name": Path(name).stem, "folder": "set"} | ctx
    return gen.prepare(ImageInput(Path("/data/set") / name, image, context))


def key_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    return path


# -- settings -------------------------------------------------------------------------------


def test_settings_validation_and_defaults() -> None:
    cfg = RemoteVLMConfig(base_url="http://gpu-box:8000/")
    assert cfg.base_url == "http://gpu-box:8000/v1"  # an empty path means /v1
    assert RemoteVLMConfig(base_url="https://h/api/v1/").base_url == "https://h/api/v1"
    for bad in ("ftp://h/v1", "http://user:pw@h/v1", "http://h/v1?x=1", "http:///v1", "h:80"):
        with pytest.raises(ValidationError):
            RemoteVLMConfig(base_url=bad)
    with pytest.raises(ValidationError, match="not both"):
        RemoteVLMConfig(api_key_file="/k", api_key_env="KEY")
    with pytest.raises(ValidationError, match="extra_body may not set"):
        RemoteVLMConfig(extra_body={"model": "other"})
    with pytest.raises(ValidationError, match="unknown prompt variable"):
        RemoteVLMConfig(prompt="Describe {colour}")
    with pytest.raises(ValidationError, match="environment variable name"):
        RemoteVLMConfig(api_key_env="MY-KEY")
    gen = RemoteVLMGenerator(RemoteVLMConfig(prompt="Tags: {tags}. Describe.", concurrency=6))
    assert gen.context_keys == {"tags"} and gen.preferred_batch_size == 12
    assert (gen.weight.value, gen.remote, gen.caption_type) == ("heavy", True, "caption")
    assert discover()["remote_vlm"].cls is RemoteVLMGenerator
    assert RemoteVLMGenerator.is_available().ok


def test_http_to_another_host_warns_loopback_and_https_do_not() -> None:
    def warns(url: str, **kw: Any) -> list[str]:
        return RemoteVLMGenerator(RemoteVLMConfig(base_url=url, **kw)).warnings()

    assert warns("http://192.168.1.20:8000/v1")
    assert "API key" in warns("http://gpu.lan:11434/v1", api_key_env="K")[0]
    for quiet in (
        "https://gpu.lan/v1",
        "http://localhost:8000",
        "http://127.0.0.2:1",
        "http://[::1]:8",
    ):
        assert warns(quiet) == [], quiet


def test_retry_after_forms() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("99999") == 3600.0
    date = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert retry_after_seconds(date, now=1445412480.0) == pytest.approx(30.0)


# -- requests ---------------------------------------------------------------------------------


def test_request_shape_resizing_model_and_answers_in_order(server: FakeOpenAI, tmp_path) -> None:
    server.api_key = KEY
    gen = gen_for(
        server,
        prompt="Describe {name} from {folder}.",
        system_prompt="You write captions.",
        max_tokens=77,
        temperature=0.3,
        max_image_side=256,
        jpeg_quality=80,
        extra_body={"top_k": 5, "keep_alive": "30m"},
        api_key_file=key_file(tmp_path),
    )
    gen.load()
    try:
        batch = [item(gen, "red", (1000, 500), "wide.png"), item(gen, "green", (40, 30), "s.png")]
        out = gen.generate(batch)
    finally:
        gen.unload()
    assert out == ["A red picture of 256x128 pixels.", "A green picture of 40x30 pixels."]
    bodies = sorted(server.requests, key=lambda b: b["messages"][1]["content"][0]["text"])
    body = bodies[1]  # "Describe wide ..."
    assert body["model"] == "test-vlm" and body["max_tokens"] == 77
    assert body["temperature"] == 0.3 and body["stream"] is False
    assert (body["top_k"], body["keep_alive"]) == (5, "30m")  # passed through
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You write captions."}
    assert user["role"] == "user"
    text, image = user["content"]
    assert text == {"type": "text", "text": "Describe wide from set."}
    assert image["type"] == "image_url"
    head, size, colour = describe_data_url(image["image_url"]["url"])
    assert (head, size, colour) == ("data:image/jpeg;base64", (256, 128), "red")
    assert {h["Authorization"] for h in server.headers} == {f"Bearer {KEY}"}
    assert server.model_lists == 1  # the load asked what the server serves
    assert KEY not in json.dumps(gen.config.model_dump(mode="json"))


def test_tags_prompt_is_filled_from_the_context(server: FakeOpenAI) -> None:
    gen = gen_for(server, prompt="Tags: {tags}. Write one sentence.")
    gen.load()
    gen.generate([item(gen, tags="1girl, red dress")])
    gen.unload()
    assert server.requests[0]["messages"][0]["content"][0]["text"] == (
        "Tags: 1girl, red dress. Write one sentence."
    )
    with pytest.raises(GenerationError, match=r"\{tags\} has no value") as info:
        item(gen)  # the worker always provides tags for such a prompt; a gap is an error
    assert not classify(info.value).retryable


@pytest.mark.parametrize("concurrency", [4, 16])
def test_concurrency_is_reached(server: FakeOpenAI, concurrency: int) -> None:
    server.delay = delay = 1.0  # long beside the overheads, so a loaded machine cannot flip it
    gen = gen_for(server, concurrency=concurrency)
    gen.load()
    batch = [item(gen, name=f"{i}.png") for i in range(concurrency * 2)]
    started = time.monotonic()
    assert len(gen.generate(batch)) == concurrency * 2
    took = time.monotonic() - started
    gen.unload()
    assert server.max_in_flight == concurrency
    # two waves (2 s), far from 2 * concurrency requests one after another (8 s or more)
    assert took < delay * 2 + 2.5


# -- load: is the server there, does it serve the model ---------------------------------------


def test_load_checks_the_server_and_the_model(server: FakeOpenAI) -> None:
    server.models = ["llava:latest", "qwen2.5-vl"]
    gen = gen_for(server)
    with pytest.raises(ModelUnavailableError, match=r"does not serve 'test-vlm'.*qwen2\.5-vl"):
        gen.load()
    assert not gen.loaded
    assert gen.status_details()["answers"] is True
    assert gen.status_details()["model_served"] is False
    relaxed = gen_for(server, check_model=False)
    relaxed.load()
    assert relaxed.loaded and relaxed.status_details()["model_served"] is False
    relaxed.unload()
    ollama = RemoteVLMGenerator(RemoteVLMConfig(base_url=server.base_url, model="llava"))
    ollama.load()  # "llava" is Ollama's "llava:latest"
    assert ollama.status_details()["model"] == "llava:latest"
    ollama.unload()
    server.models = ["only-one"]
    anyone = RemoteVLMGenerator(RemoteVLMConfig(base_url=server.base_url))
    anyone.load()  # model = "": the server's only model
    anyone.generate([item(anyone)])
    anyone.unload()
    assert server.requests[-1]["model"] == "only-one"


def test_load_when_the_server_is_down_is_a_network_error() -> None:
    s = FakeOpenAI().start()
    url = s.base_url
    s.stop()
    gen = RemoteVLMGenerator(RemoteVLMConfig(base_url=url, model="test-vlm"))
    with pytest.raises(NetworkError) as info:
        gen.load()
    assert classify(info.value).error_type is ErrorType.NETWORK and info.value.retryable
    assert gen.status_details()["answers"] is False


def test_api_key_file_must_be_0600_and_env_key(server: FakeOpenAI, tmp_path, monkeypatch) -> None:
    server.api_key = KEY
    loose = gen_for(server, api_key_file=key_file(tmp_path, 0o644))
    with pytest.raises(ModelUnavailableError, match="must be 0600") as info:
        loose.load()
    assert KEY not in str(info.value)
    missing = gen_for(server, api_key_env="CAPTIOND_TEST_KEY")
    monkeypatch.delenv("CAPTIOND_TEST_KEY", raising=False)
    with pytest.raises(ModelUnavailableError, match="CAPTIOND_TEST_KEY is not set"):
        missing.load()
    none = gen_for(server)
    with pytest.raises(ModelUnavailableError, match="needs an API key"):
        none.load()
    monkeypatch.setenv("CAPTIOND_TEST_KEY", KEY)
    env = gen_for(server, api_key_env="CAPTIOND_TEST_KEY")
    env.load()
    env.generate([item(env)])
    env.unload()
    assert server.headers[-1]["Authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv("CAPTIOND_TEST_KEY", "sk-wrong-key-0000")
    with pytest.raises(ModelUnavailableError, match="refused the API key"):
        gen_for(server, api_key_env="CAPTIOND_TEST_KEY").load()


# -- errors, typed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "cls", "error_type", "retryable"),
    [
        ("429", NetworkError, "network", True),
        ("500", NetworkError, "network", True),
        ("drop", NetworkError, "network", True),
        ("hang", GenerationTimeoutError, "timeout", True),
        ("400", RemoteRequestError, "generation", False),
        ("garbage", GenerationError, "generation", True),
        ("empty", GenerationError, "generation", True),
        ("cut", AnswerCutError, "generation", False),
    ],
)
def test_each_failure_ends_as_its_type(
    server: FakeOpenAI, tmp_path, mode: str, cls: type, error_type: str, retryable: bool
) -> None:
    server.api_key = KEY
    server.hang_seconds = 2.0
    gen = gen_for(server, timeout_seconds=0.5, api_key_file=key_file(tmp_path))
    gen.load()
    server.mode = mode
    with pytest.raises(cls) as info:
        gen.generate([item(gen)])
    gen.unload()
    c = classify(info.value)
    assert (c.error_type.value, c.retryable) == (error_type, retryable)
    assert KEY not in c.message
    if mode == "429":
        assert info.value.retry_after == 7.0
    if mode == "400":
        assert "image too large" in c.message  # the server's own words, without the key
    if mode == "500":
        assert "engine crashed" in c.message and info.value.retry_after is None


def test_server_gone_is_a_network_error(server: FakeOpenAI) -> None:
    gen = gen_for(server)
    gen.load()
    server.stop()
    with pytest.raises(NetworkError):
        gen.generate([item(gen)])
    assert gen.status_details()["answers"] is False
    gen.unload()


def test_a_failed_batch_keeps_each_outcome_and_asks_nothing_twice(server: FakeOpenAI) -> None:
    server.plan = lambda body: "500" if "bad" in json.dumps(body["messages"]) else "ok"
    gen = gen_for(server, prompt="Describe {name}.")
    gen.load()
    batch = [item(gen, name=n) for n in ("a.png", "bad.png", "c.png")]
    with pytest.raises(NetworkError):
        gen.generate(batch)
    assert len(server.requests) == 3
    # The worker retries image by image: answers are kept, the failure raised once.
    assert gen.generate([batch[0]]) == ["A red picture of 64x48 pixels."]
    with pytest.raises(NetworkError):
        gen.generate([batch[1]])
    assert gen.generate([batch[2]]) == ["A red picture of 64x48 pixels."]
    assert len(server.requests) == 3
    server.plan = None
    assert gen.generate([batch[1]]) == ["A red picture of 64x48 pixels."]  # asked again
    assert len(server.requests) == 4
    gen.unload()


# -- residency: in-process, no room taken, one breaker per server, jobs wait ---------------


def manager_for(
    configs: dict[str, RemoteVLMConfig], monotonic: Any = None, **residency: Any
) -> ModelManager:
    from daemon.config import ResidencyConfig

    found = {n: Discovered(n, RemoteVLMGenerator) for n in configs}
    return ModelManager.build(
        list(configs),
        found,
        lambda name, cls: configs[name],
        retry_seconds=0.05,
        residency=ResidencyConfig(**({"max_resident_heavy": 1} | residency)),
        **({"monotonic": monotonic} if monotonic is not None else {}),
    )


def test_remote_runs_in_process_takes_no_room_and_shares_a_breaker_per_server(server) -> None:
    other = FakeOpenAI(models=("test-vlm",)).start()
    try:
        models = manager_for(
            {
                "a": RemoteVLMConfig(base_url=server.base_url, model="test-vlm"),
                "b": RemoteVLMConfig(base_url=server.base_url + "/", model="test-vlm"),
                "c": RemoteVLMConfig(base_url=other.base_url, model="test-vlm"),
            },
            memory_budget_mb=1,
        )
        a, b, c = (models.get(n) for n in "abc")
        assert a.breaker is b.breaker and a.breaker is not c.breaker
        for slot in (a, b, c):
            assert not slot.isolated and slot.heavy and slot.remote
            assert slot.ensure_loaded(wait=True), slot.why_not()
        assert all(s.state is ModelState.LOADED for s in (a, b, c))  # cap 1, budget 1 MB
        assert models.summary()["resident_heavy"] == 0
        details = a.status()["details"]
        assert details["server"] == server.base_url and details["model_served"] is True
        models.unload_all()
    finally:
        other.stop()


class FakeQueue:
    def __init__(self) -> None:
        self.released: list[tuple[int, float]] = []

    def release(self, ids, delay: float = 0.0) -> None:
        self.released += [(i, delay) for i in ids]


def test_network_failures_release_the_job_without_an_attempt_up_to_a_cap(server) -> None:
    models = manager_for({"a": RemoteVLMConfig(base_url=server.base_url)})
    q = FakeQueue()
    assert models.job_failed(q, 1, NetworkError("429", retry_after=7.0), "a")
    assert models.job_failed(q, 2, NetworkError("refused"), "a")
    assert q.released == [(1, 7.0), (2, models.get("a").breaker.cooldown)]
    assert not models.job_failed(q, 3, GenerationTimeoutError("slow"), "a")  # uses an attempt
    for _ in range(NETWORK_WAITS_PER_JOB - 1):
        assert models.job_failed(q, 1, NetworkError("500"), "a")
    assert not models.job_failed(q, 1, NetworkError("500"), "a")  # now it counts


def test_network_error_crosses_the_child_process_boundary_typed() -> None:
    from daemon.residency.child import _describe, _rebuild

    back = _rebuild(_describe(NetworkError("server down", retry_after=3.0)))
    assert isinstance(back, NetworkError) and back.retry_after == 3.0


class Rig:
    """The real worker and queue with remote_vlm as the only generator."""

    def __init__(self, tmp_path: Path, cfg: RemoteVLMConfig, **residency: Any):
        from daemon.config import ResidencyConfig

        self.root = tmp_path / "data"
        self.root.mkdir()
        self.settings = Settings(
            state_dir=tmp_path / "state",
            watch=[{"path": self.root, "generators": ["remote_vlm"], "sidecar_extension": "txt"}],
            worker={"preload": [], "batch_size": 2},
            queue={"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.1, "max_attempts": 3},
        )
        self.db = Database(tmp_path / "state" / "q.db")
        self.queue = JobQueue(self.db, backoff_base=0.05, backoff_max=0.1, max_attempts=3)
        self.models = ModelManager.build(
            ["remote_vlm"],
            {"remote_vlm": Discovered("remote_vlm", RemoteVLMGenerator)},
            lambda name, cls: cfg,
            retry_seconds=0.2,
            residency=ResidencyConfig(**residency),
        )
        self.worker = Worker(
            settings=self.settings, queue=self.queue, index=FileIndex(self.db), models=self.models
        )

    def add(self, n: int) -> list[Path]:
        paths = [make_image(self.root / f"i{i:02d}.png", "red") for i in range(n)]
        for p in paths:
            self.queue.enqueue(str(p), "remote_vlm", 100)
        return paths

    def jobs(self) -> list[tuple[str, int]]:
        con = sqlite3.connect(self.db.path)
        try:
            return con.execute("SELECT state, attempts FROM jobs ORDER BY path").fetchall()
        finally:
            con.close()

    def done(self) -> bool:
        return all(state == "done" for state, _ in self.jobs())


def test_worker_claims_enough_for_the_concurrency(server: FakeOpenAI, tmp_path) -> None:
    server.delay = 0.3
    rig = Rig(tmp_path, RemoteVLMConfig(base_url=server.base_url, model="test-vlm", concurrency=6))
    paths = rig.add(12)
    rig.worker.start()
    try:
        wait_for(rig.done, timeout=30)
    finally:
        rig.worker.stop()
    assert server.max_in_flight == 6  # worker.batch_size is 2
    assert {p.with_suffix(".txt").read_text() for p in paths} == {
        "A red picture of 64x48 pixels.\n"
    }


def test_server_down_then_back_jobs_wait_breaker_opens_and_closes(tmp_path) -> None:
    """The server goes away mid-batch and comes back: every image gets its caption,
    no failure used an attempt, the breaker opened while it was gone and closed after."""
    server = FakeOpenAI(delay=0.2).start()
    port = server.port
    cfg = RemoteVLMConfig(base_url=server.base_url, model="test-vlm", concurrency=4)
    rig = Rig(tmp_path, cfg, breaker_threshold=3, breaker_cooldown_seconds=0.3)
    paths = rig.add(24)
    slot = rig.models.get("remote_vlm")
    rig.worker.start()
    try:
        wait_for(lambda: len(server.requests) >= 6, timeout=20)
        server.stop()  # mid-batch: requests in flight are cut, new ones refused
        wait_for(lambda: slot.breaker.times_opened >= 1, timeout=20)
        wait_for(lambda: any(s == "pending" for s, _ in rig.jobs()), timeout=10)
        assert not {s for s, _ in rig.jobs()} & {"failed", "dead"}
        time.sleep(1.0)
        server = FakeOpenAI(delay=0.2, port=port).start()
        wait_for(rig.done, timeout=60)
    finally:
        rig.worker.stop()
        server.stop()
    # attempts counts claims: the one that succeeded; every network failure was given back
    assert all(attempts == 1 for _, attempts in rig.jobs()), rig.jobs()
    assert slot.breaker.state is BreakerState.CLOSED
    for p in paths:
        assert p.with_suffix(".txt").read_text() == "A red picture of 64x48 pixels.\n"


# -- multi-person with a remote describer --------------------------------------------------


def test_multi_person_remote_describer(server: FakeOpenAI, wd_model_dir: Path) -> None:
    from daemon.generators.detection import Person
    from daemon.generators.multi_person import (
        PERSON_PROMPT,
        SCENE_PROMPT,
        MultiPersonConfig,
        MultiPersonGenerator,
    )
    from daemon.generators.wd_tagger import WDTaggerConfig

    class Detector:
        def detect(self, images):
            return [[Person((0, 0, 100, 100), 0.9), Person((150, 0, 230, 80), 0.9)]]

    arr = Image.new("RGB", (300, 200), (0, 0, 0))
    arr.paste((255, 0, 0), (0, 0, 100, 100))
    arr.paste((0, 255, 0), (150, 0, 230, 80))
    server.delay = 0.3
    config = MultiPersonConfig(
        mode="fine_tune_caption",
        tagger=WDTaggerConfig(model=str(wd_model_dir)),
        describer={"use": "remote_vlm", "base_url": server.base_url, "model": "test-vlm"},
    )
    gen = MultiPersonGenerator(config, detector=Detector())
    assert gen.warnings() == []  # loopback
    gen.load()
    assert gen.status_details()["describer"]["model_served"] is True
    out = gen.generate([gen.prepare(ImageInput(Path("two.png"), arr))])
    gen.unload()
    lines = out[0].splitlines()
    assert lines[0] == "sksA: A red picture of 110x110 pixels."  # 10 px padding, clipped
    assert lines[1] == "sksB: A green picture of 100x90 pixels."
    assert lines[2] == "Scene: A black picture of 300x200 pixels."
    prompts = [b["messages"][0]["content"][0]["text"] for b in server.requests]
    assert sorted(prompts) == sorted([PERSON_PROMPT, PERSON_PROMPT, SCENE_PROMPT])
    assert server.max_in_flight == 3  # both people and the scene at once


# -- end to end: {tags} from the tagger, the key nowhere -------------------------------------


@pytest.mark.slow
def test_daemon_end_to_end_tags_prompt_and_no_key_anywhere(tmp_path, wd_model_dir) -> None:
    from daemon.client import request

    root = tmp_path / "dataset"
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    (tmp_path / "run").mkdir()
    keyfile = key_file(tmp_path)
    server = FakeOpenAI(api_key=KEY).start()
    # one image's request is refused with a message that quotes the Authorization header
    server.plan = lambda body: "400" if "blue" in json.dumps(body["messages"]) else "ok"
    try:
        for name, colour in (("r.png", "red"), ("g.png", "green"), ("blue.png", "blue")):
            make_image(root / name, colour)
        d = DaemonProcess(
            tmp_path / "run",
            [root],
            wd_model_dir,
            watch={
                "generators": ["wd_tagger", "remote_vlm"],
                "sidecar_extension": {"wd_tagger": "tags", "remote_vlm": "txt"},
            },
            sections={
                "generators.remote_vlm": {
                    "base_url": server.base_url,
                    "model": "test-vlm",
                    "prompt": "Tags: {tags}. Describe {name}.",
                    "api_key_file": str(keyfile),
                },
                "generators.far": {"use": "remote_vlm", "base_url": "http://10.255.255.1:8000"},
            },
        )
        # a watch of an empty folder puts the far instance in use: no job, no request
        d.config.write_text(
            d.config.read_text()
            + f'[[watch]]\npath = "{empty}"\ngenerators = ["far"]\nsidecar_extension = "far"\n'
        )
        d.start()
        try:
            wait_for(lambda: (root / "r.txt").exists() and (root / "g.txt").exists(), 60)
            wait_for(lambda: d.status()["queue"]["totals"].get("failed", 0) == 1, 30)
            tags = (root / "r.tags").read_text().strip()
            texts = [b["messages"][0]["content"][0]["text"] for b in server.requests]
            assert f"Tags: {tags}. Describe r." in texts
            assert (root / "r.txt").read_text() == "A red picture of 64x48 pixels.\n"
            assert not (root / "blue.txt").exists()
            status = d.status()
            assert any("generator far" in w and "http://" in w for w in status["warnings"])
            change = json.dumps({"base_url": "http://127.0.0.1:1/v1"}).encode()
            code, body = request(d.socket, "PUT", "/api/captioner-config/remote_vlm", change)
            assert code == 403
            answers = [json.dumps(status)]
            for path in ("/api/generators", "/openapi.json", "/api/models", "/api/queue"):
                code, body = request(d.socket, "GET", path, timeout=5)
                assert code == 200, (path, body)
                answers.append(json.dumps(body))
            assert "image too large" in answers[0]  # the failed job's error is shown...
            for text in answers:
                assert KEY not in text  # ...without the key
            assert "remote_vlm" in answers[1] and server.base_url in answers[1]
        finally:
            d.stop()
        assert d.logs() and KEY not in d.logs()
        assert server.headers and all(h["Authorization"] == f"Bearer {KEY}" for h in server.headers)
    finally:
        server.stop()
        os.environ.pop("CAPTIOND_TEST_KEY", None)


def test_instances_on_one_server_open_and_probe_together(server: FakeOpenAI) -> None:
    now = [1000.0]  # the breakers' clock: the cool-down passes when the test says so
    models = manager_for(
        {
            "a": RemoteVLMConfig(base_url=server.base_url, model="test-vlm"),
            "b": RemoteVLMConfig(base_url=server.base_url, model="test-vlm"),
        },
        monotonic=lambda: now[0],
        breaker_threshold=2,
        breaker_cooldown_seconds=0.3,
    )
    a, b = models.get("a"), models.get("b")
    assert a.ensure_loaded(wait=True) and b.ensure_loaded(wait=True)
    gen_a = a.raw
    server.mode = "500"
    for _ in range(2):
        with pytest.raises(NetworkError):
            a.generator.generate([item(gen_a)])
    assert a.breaker.state is BreakerState.OPEN
    assert not b.ready  # b never failed, but its server did
    now[0] += 0.35
    server.mode = "ok"
    assert b.ready  # past the cool-down: b's next batch is the probe
    assert b.generator.generate([item(b.raw)]) == ["A red picture of 64x48 pixels."]
    assert a.breaker.state is BreakerState.CLOSED
    models.unload_all()


def test_a_name_that_does_not_resolve_is_a_network_error(monkeypatch) -> None:
    """DNS failure, simulated: the resolver is replaced, nothing leaves the machine."""
    import socket

    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "gpu-box.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    gen = RemoteVLMGenerator(RemoteVLMConfig(base_url="http://gpu-box.invalid:8000/v1"))
    with pytest.raises(NetworkError, match="Name or service not known") as info:
        gen.load()
    assert classify(info.value).error_type is ErrorType.NETWORK
