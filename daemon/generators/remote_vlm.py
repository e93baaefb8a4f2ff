"""Describe images with a model served elsewhere, over the OpenAI chat-completions API.

vLLM, Ollama, llama.cpp's ``llama-server``, LM Studio and others answer
``POST {base_url}/chat/completions`` with images as base64 ``data:`` URLs in
``image_url`` content parts, and list their models at ``GET {base_url}/models``.

- ``prepare()`` (decode pool) fills the prompt (``{tags}``, ``{name}``, ``{folder}``),
  shrinks the image to ``max_image_side`` and encodes it as JPEG.
- ``generate()`` sends one request per image, ``concurrency`` at a time, so that the
  server's own batching (vLLM's continuous batching) gets work.
- ``load()`` holds no model: it reads the API key, opens the HTTP client and asks the
  server which models it serves. A server that does not answer fails the load (the
  jobs wait in the queue); one that does not serve the configured model too, unless
  ``check_model = false``.

Errors are typed (never by message text): refused or dropped connections, names that
do not resolve, 429 and 5xx are :class:`~daemon.errors.NetworkError` (retryable, with
the server's ``Retry-After``); a timeout is ``GenerationTimeoutError``; another 4xx is
:class:`RemoteRequestError` (not retryable, with the server's message); an empty,
cut or unreadable answer is a ``generation`` error.

The API key is read at load time from a 0600 file or a named environment variable and
kept only in the HTTP client's headers: never in the settings, status or messages.
"""

from __future__ import annotations

import base64
import email.utils
import importlib.util
import io
import ipaddress
import os
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image
from pydantic import Field, field_validator, model_validator

from daemon.errors import (
    CaptionError,
    ErrorType,
    GenerationError,
    GenerationTimeoutError,
    ModelUnavailableError,
    NetworkError,
)
from daemon.generators.base import (
    Availability,
    Generator,
    GeneratorConfig,
    ImageInput,
    WeightClass,
)
from daemon.generators.vlm import PROMPT_VARIABLES, prompt_variables, render_prompt, shrink

DEFAULT_PROMPT = "Describe this image in one detailed paragraph."
# Request fields that captiond sets itself; extra_body may not replace them.
RESERVED_FIELDS = frozenset({"model", "messages", "stream", "n"})
MAX_MESSAGE_CHARS = 300  # of a server's error text, in our messages
MAX_RETRY_AFTER_SECONDS = 3600.0
MAX_KEY_BYTES = 4096


class RemoteRequestError(GenerationError):
    """The server refused the request (a 4xx other than 429): a wrong model name, a
    request it cannot take, a missing or refused key. Retrying sends the same request,
    so it is not retryable."""

    error_type = ErrorType.GENERATION
    retryable = False


class AnswerCutError(GenerationError):
    """The answer stopped at ``max_tokens`` (finish_reason ``length``): a cut caption
    is not written. The same request would be cut again: raise max_tokens."""

    error_type = ErrorType.GENERATION
    retryable = False


# -- settings ---------------------------------------------------------------------------


def normalise_base_url(value: str) -> str:
    """``http(s)://host[:port]/path`` without a trailing slash; an empty path becomes
    ``/v1`` (the OpenAI convention). Credentials, queries and fragments are refused:
    the address is shown in status and logs."""
    v = value.strip()
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"base_url {v!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"base_url {v!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("base_url may not hold credentials: use api_key_file or api_key_env")
    if parts.query or parts.fragment:
        raise ValueError(f"base_url {v!r} may not have a query or fragment")
    _ = parts.port  # raises ValueError for a port that is not a number in range
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteVLMConfig(GeneratorConfig):
    """Settings of ``[generators.remote_vlm]`` (and of a remote multi_person describer)."""

    base_url: str = "http://127.0.0.1:8000/v1"  # config.toml only
    model: str = ""  # as the server names it; "" = the server's only model
    check_model: bool = True  # the load fails unless GET /models lists the model
    prompt: str | None = None  # None = DEFAULT_PROMPT; may use {tags} {name} {folder}
    system_prompt: str | None = None  # None = no system message
    max_tokens: int = Field(300, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_image_side: int = Field(1024, ge=0)  # longer side before sending; 0 = as is
    jpeg_quality: int = Field(90, ge=1, le=100)
    concurrency: int = Field(4, ge=1, le=256)  # requests in flight
    timeout_seconds: float = Field(120.0, gt=0, le=3600)  # per request, whole answer
    api_key_file: Path | None = None  # a 0600 file owned by the daemon's user; config.toml only
    api_key_env: str | None = None  # or the name of an environment variable holding it
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every request

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        return normalise_base_url(v)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return v.strip()

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("prompt is empty; leave it out for the default")
        unknown = sorted(prompt_variables(v) - set(PROMPT_VARIABLES))
        if unknown:
            raise ValueError(
                f"unknown prompt variable(s) {', '.join('{' + u + '}' for u in unknown)}; "
                f"known: {', '.join('{' + k + '}' for k in PROMPT_VARIABLES)}"
            )
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not (v and (v.replace("_", "a").isalnum()) and not v[0].isdigit()):
            raise ValueError(f"api_key_env {v!r} is not an environment variable name")
        return v

    @field_validator("extra_body")
    @classmethod
    def _extra(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(RESERVED_FIELDS & set(v))
        if clash:
            raise ValueError(f"extra_body may not set {', '.join(clash)} (captiond sets them)")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> RemoteVLMConfig:
        if self.api_key_file is not None and self.api_key_env is not None:
            raise ValueError("set api_key_file or api_key_env, not both")
        return self


def read_api_key(config: RemoteVLMConfig) -> str | None:
    """The API key from ``api_key_file`` (a regular 0600 file owned by this user, like
    the control API's token) or the environment variable ``api_key_env``; None when
    neither is set. Errors name the file or variable, never the key."""
    if config.api_key_env is not None:
        value = os.environ.get(config.api_key_env, "").strip()
        if not value:
            raise ModelUnavailableError(
                f"api_key_env: the environment variable {config.api_key_env} is not set"
            )
        return value
    path = config.api_key_file
    if path is None:
        return None
    path = path.expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModelUnavailableError(f"api_key_file {path} does not exist") from None
    except OSError as exc:
        raise ModelUnavailableError(f"api_key_file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelUnavailableError(f"api_key_file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ModelUnavailableError(
                f"api_key_file {path} has mode {oct(st.st_mode & 0o777)}; it must be 0600 "
                f"(chmod 600 {path})"
            )
        if st.st_uid != os.geteuid():
            raise ModelUnavailableError(
                f"api_key_file {path} must be owned by the daemon's user (uid {os.geteuid()}), "
                f"not uid {st.st_uid}"
            )
        raw = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_BYTES:
        raise ModelUnavailableError(f"api_key_file {path} is larger than {MAX_KEY_BYTES} bytes")
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ModelUnavailableError(f"api_key_file {path} is not ASCII text") from None
    if not key or any(c.isspace() for c in key):
        raise ModelUnavailableError(f"api_key_file {path} must hold one key on one line")
    return key


# -- the client ------------------------------------------------------------------------------


@dataclass(slots=True)
class RemoteItem:
    """One prepared image: its prompt and JPEG data URL. ``answer``/``error`` keep the
    outcome of this item's request within a batch that failed as a whole, so that the
    worker's image-by-image retry of that batch sends no request twice."""

    name: str
    prompt: str
    data_url: str
    size: tuple[int, int]  # width, height sent
    answer: str | None = None
    error: BaseException | None = None


def encode_image(image: Image.Image, max_side: int, quality: int) -> tuple[str, tuple[int, int]]:
    """RGB (transparency on white), shrunk, as a ``data:image/jpeg;base64,`` URL."""
    img = shrink(image, max_side)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.size


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """HTTP ``Retry-After``: seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def matches_served(model: str, served: Sequence[str]) -> str | None:
    """The served name ``model`` refers to: exact, or Ollama's implicit ``:latest``."""
    if model in served:
        return model
    for name in served:
        if name == f"{model}:latest" or model == f"{name}:latest":
            return name
    return None


class RemoteClient:
    """HTTP side of a remote describer: key, connection pool, requests, error typing.
    Thread-safe: ``ask`` runs on ``concurrency`` threads."""

    def __init__(self, config: RemoteVLMConfig):
        self.config = config
        self.server = config.base_url
        self._key: str | None = None
        self._http: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._httpx: Any = None
        # status (plain values; read without a lock)
        self.answers: bool | None = None
        self.model = config.model
        self.model_served: bool | None = None
        self.served: list[str] = []
        self.checked_at: float | None = None

    @property
    def open(self) -> bool:
        return self._http is not None

    def _scrub(self, text: str) -> str:
        key = self._key
        text = " ".join(text.split())
        if key and key in text:
            text = text.replace(key, "[key]")
        return text[:MAX_MESSAGE_CHARS] + ("..." if len(text) > MAX_MESSAGE_CHARS else "")

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._http is not None:
            return
        try:
            import httpx
        except ImportError as exc:
            raise ModelUnavailableError(f"httpx is not installed: {exc}") from exc
        cfg = self.config
        key = read_api_key(cfg)
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(cfg.timeout_seconds, connect=min(10.0, cfg.timeout_seconds))
        limits = httpx.Limits(
            max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
        )
        self._httpx = httpx
        self._key = key
        self._http = httpx.Client(
            headers=headers, timeout=timeout, limits=limits, follow_redirects=False
        )
        self._pool = ThreadPoolExecutor(cfg.concurrency, "captiond-remote")
        try:
            self.check()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        http, pool = self._http, self._pool
        self._http = self._pool = None
        self._key = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if http is not None:
            http.close()

    # -- requests ----------------------------------------------------------------------
    def _transport_error(self, exc: BaseException, what: str) -> CaptionError:
        httpx = self._httpx
        detail = self._scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if isinstance(exc, httpx.ConnectTimeout):
            return NetworkError(f"{self.server}: no connection within the timeout ({what})")
        if isinstance(exc, httpx.TimeoutException):
            return GenerationTimeoutError(
                f"{self.server} did not answer {what} within {self.config.timeout_seconds:g} s "
                "(timeout_seconds)"
            )
        return NetworkError(f"{self.server}: {what} failed: {detail}")

    def _server_message(self, response: Any) -> str:
        text = ""
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                err = err.get("message") or err.get("msg")
            for candidate in (err, data.get("message"), data.get("detail")):
                if isinstance(candidate, str) and candidate.strip():
                    text = candidate
                    break
        if not text:
            text = response.text if response.content else ""
        return self._scrub(text) or response.reason_phrase or "no message"

    def _status_error(self, response: Any, what: str) -> CaptionError:
        code = response.status_code
        message = self._server_message(response)
        if code == 429 or code >= 500:
            return NetworkError(
                f"{self.server} answered {code} to {what}: {message}",
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        return RemoteRequestError(f"{self.server} refused {what} ({code}): {message}")

    def check(self) -> None:
        """``GET /models``: does the server answer, and does it serve the model?"""
        http = self._http
        if http is None:
            raise ModelUnavailableError("remote_vlm is not loaded")
        cfg = self.config
        self.checked_at = time.time()
        try:
            response = http.get(f"{self.server}/models")
        except self._httpx.HTTPError as exc:
            self.answers = False
            err = self._transport_error(exc, "GET /models")
            if isinstance(err, GenerationTimeoutError):  # a load is not a generation
                err = NetworkError(str(err))
            raise err from None
        self.answers = response.status_code < 500 and response.status_code != 429
        if response.status_code in (401, 403):
            how = "refused the API key" if self._key else "needs an API key (api_key_file)"
            raise ModelUnavailableError(
                f"{self.server} {how} ({response.status_code}): {self._server_message(response)}"
            )
        if response.status_code == 404 and (cfg.model or not cfg.check_model):
            self.model_served = None  # cannot list models; try the requests
            return
        if not response.is_success:
            err = self._status_error(response, "GET /models")
            if isinstance(err, RemoteRequestError):
                raise ModelUnavailableError(str(err))
            raise err
        try:
            data = response.json()
            served = [str(m["id"]) for m in data["data"]]
        except (ValueError, KeyError, TypeError):
            raise ModelUnavailableError(
                f"{self.server}/models did not answer with an OpenAI model list: is base_url "
                "the server's OpenAI-compatible address (usually ending in /v1)?"
            ) from None
        self.served = served[:20]
        if not cfg.model:
            if len(served) != 1:
                raise ModelUnavailableError(
                    f"set model: {self.server} serves {len(served)} models "
                    f"({', '.join(served[:10]) or 'none'})"
                )
            self.model, self.model_served = served[0], True
            return
        name = matches_served(cfg.model, served)
        self.model_served = name is not None
        self.model = name or cfg.model
        if name is None and cfg.check_model:
            raise ModelUnavailableError(
                f"{self.server} does not serve {cfg.model!r}; it serves: "
                f"{', '.join(served[:10]) or 'nothing'} (set model to one of them, or "
                "check_model = false for a server that takes any name)"
            )

    def body(self, item: RemoteItem) -> dict[str, Any]:
        cfg = self.config
        messages: list[dict[str, Any]] = []
        if cfg.system_prompt:
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": item.prompt},
                    {"type": "image_url", "image_url": {"url": item.data_url}},
                ],
            }
        )
        return {
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            **cfg.extra_body,
            "model": self.model,
            "messages": messages,
            "stream": False,
        }

    def ask(self, item: RemoteItem) -> str:
        """One chat completion for one image; the answer's text, stripped."""
        http = self._http
        if http is None:
            raise GenerationError("remote_vlm is not loaded")
        what = f"the request for {item.name}"
        try:
            response = http.post(f"{self.server}/chat/completions", json=self.body(item))
        except self._httpx.HTTPError as exc:
            self.answers = False
            raise self._transport_error(exc, what) from None
        if not response.is_success:
            self.answers = response.status_code < 500 and response.status_code != 429
            raise self._status_error(response, what)
        self.answers = True
        try:
            data = response.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise GenerationError(
                f"{self.server} answered {what} with something that is not a chat completion"
            ) from None
        if isinstance(content, list):  # content parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        text = content.strip() if isinstance(content, str) else ""
        if choice.get("finish_reason") == "length":
            raise AnswerCutError(
                f"the answer for {item.name} was cut at max_tokens = {self.config.max_tokens}; "
                "raise max_tokens or ask for a shorter caption"
            )
        if not text:
            raise GenerationError(f"{self.server} answered {what} with an empty text")
        return text

    def ask_all(self, items: Sequence[RemoteItem]) -> list[str]:
        """Every item's answer, ``concurrency`` requests in flight. Items answered by an
        earlier, failed call are not asked again. If any request fails, every item
        keeps its own outcome and the first failure is raised; an item's kept error is
        raised (once) when it is asked alone."""
        pool = self._pool
        if pool is None:
            raise GenerationError("remote_vlm is not loaded")
        if len(items) == 1 and items[0].error is not None:
            err, items[0].error = items[0].error, None
            raise err
        todo = [it for it in items if it.answer is None]

        def one(it: RemoteItem) -> None:
            try:
                it.answer, it.error = self.ask(it), None
            except Exception as exc:
                it.error = exc

        if len(todo) == 1:
            one(todo[0])
        else:
            for future in [pool.submit(one, it) for it in todo]:
                future.result()
        failed = [it for it in items if it.answer is None]
        if failed:
            first = failed[0]
            err = first.error or GenerationError(f"no answer for {first.name}")
            if len(items) == 1:
                first.error = None
            raise err
        return [it.answer for it in items]  # type: ignore[misc]

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server": self.server, "model": self.model}
        if self.checked_at is not None:
            out |= {
                "answers": self.answers,
                "model_served": self.model_served,
                "served_models": list(self.served[:10]),
            }
        return out


def http_warning(config: RemoteVLMConfig) -> list[str]:
    parts = urlsplit(config.base_url)
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        key = config.api_key_file is not None or config.api_key_env is not None
        return [
            f"base_url {config.base_url} sends images{' and the API key' if key else ''} "
            "unencrypted to another machine (http:// to a host other than this one); "
            "use https:// or a tunnel on a network you do not trust"
        ]
    return []


# -- the generator ------------------------------------------------------------------------------


class RemoteVLMGenerator(Generator):
    name = "remote_vlm"
    caption_type = "caption"
    description = (
        "Prose captions from a vision-language model on an OpenAI-compatible server "
        "(vLLM, Ollama, llama.cpp's llama-server, LM Studio)"
    )
    version = "1"
    weight = WeightClass.HEAVY  # scheduled like a VLM: loaded on demand, in the background
    remote = True
    config_model = RemoteVLMConfig

    config: RemoteVLMConfig

    def __init__(self, config: RemoteVLMConfig | None = None, *, cache_dir: Path | None = None):
        super().__init__(config, cache_dir=cache_dir)
        self._client: RemoteClient | None = None
        self._last: RemoteClient | None = None  # for status after an unload or failed load
        self._lock = threading.Lock()

    @classmethod
    def is_available(cls) -> Availability:
        try:
            if importlib.util.find_spec("httpx") is None:
                return Availability(False, "httpx is not installed (pip install httpx)")
        except (ImportError, ValueError) as exc:
            return Availability(False, f"httpx cannot be found: {exc}")
        return Availability(True)

    @property
    def loaded(self) -> bool:
        client = self._client
        return client is not None and client.open

    @property
    def prompt(self) -> str:
        return self.config.prompt if self.config.prompt is not None else DEFAULT_PROMPT

    @property
    def context_keys(self) -> frozenset[str]:
        return frozenset(prompt_variables(self.prompt) - {"name", "folder"})

    @property
    def draft_size(self) -> int | None:
        return self.config.max_image_side or None

    @property
    def draft_longer_side(self) -> bool:
        return True  # shrink() bounds the longer side

    @property
    def preferred_batch_size(self) -> int | None:
        # Two waves per generate() call: the wait for a batch's slowest answer, when no
        # request is in flight, comes half as often.
        return 2 * self.config.concurrency

    @property
    def server(self) -> str | None:
        return self.config.base_url

    def warnings(self) -> list[str]:
        return http_warning(self.config)

    def status_details(self) -> dict[str, Any]:
        client = self._client or self._last
        return client.status() if client is not None else {"server": self.config.base_url}

    def load(self) -> None:
        with self._lock:
            if self.loaded:
                return
            client = RemoteClient(self.config)
            self._last = client
            client.start()
            self._client = client

    def unload(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def prepare(self, item: ImageInput) -> RemoteItem:
        """Prompt filled, image shrunk and JPEG-encoded (the decode pool's work)."""
        prompt = render_prompt(self.prompt, item.context, where=str(item.path))
        url, size = encode_image(item.image, self.config.max_image_side, self.config.jpeg_quality)
        return RemoteItem(item.path.name, prompt.strip(), url, size)

    def generate(self, batch: Sequence[RemoteItem]) -> list[str]:
        client = self._client
        if client is None:
            raise GenerationError("remote_vlm is not loaded")
        if not batch:
            return []
        return client.ask_all(batch)


class RemoteDescriber:
    """A remote server as multi_person's describer: every crop and the scene of a batch
    are asked concurrently (``concurrency`` in flight)."""

    def __init__(self, config: RemoteVLMConfig):
        self.config = config
        self.client = RemoteClient(config)

    @property
    def loaded(self) -> bool:
        return self.client.open

    def load(self) -> None:
        self.client.start()

    def unload(self) -> None:
        self.client.close()

    def describe(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        cfg = self.config
        items = []
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            url, size = encode_image(image, cfg.max_image_side, cfg.jpeg_quality)
            items.append(RemoteItem(f"crop {i + 1}", prompt.strip(), url, size))
        return self.client.ask_all(items)
