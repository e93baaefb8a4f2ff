"""Configuration: ``config.toml`` plus ``CAPTIOND_*`` environment overrides.

File lookup: ``--config``, ``$CAPTIOND_CONFIG``, ``./config.toml``,
``$XDG_CONFIG_HOME/captiond/config.toml``, ``/etc/captiond/config.toml``.
Environment overrides use ``__`` for nesting, e.g. ``CAPTIOND_WORKER__BATCH_SIZE=4``.
Invalid configuration raises ConfigError with one readable message naming the file
and the key; the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

DEFAULT_IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff"]

# Priority classes: an explicit request beats a newly seen file beats a backfill scan.
# A watch's own ``priority`` (-50..50) shifts its jobs within the class.
PRIORITY_EXPLICIT = 200
PRIORITY_NEW = 100
PRIORITY_BACKFILL = 0


class ConfigError(Exception):
    """A configuration problem, already phrased for a person."""


_EXT_RE = re.compile(r"[\w+-]+(\.[\w+-]+)*")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WatchConfig(_Section):
    path: Path
    name: str = ""  # default: the folder's name
    recursive: bool = True
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    generators: list[str] = Field(default_factory=lambda: ["wd_tagger"])
    # One extension for every generator of this watch, or a table generator -> extension.
    # Default: the generator's caption_type (``tags`` -> ``.tags``).
    sidecar_extension: str | dict[str, str] | None = None
    # ``stem``: a.jpg -> a.txt (what trainers read). ``name``: a.jpg -> a.jpg.txt.
    sidecar_naming: Literal["stem", "name"] = "stem"
    # A file symlink is followed only when its target stays inside this root ("inside"),
    # never ("never"), or always ("all": unsafe, whoever can write here can make captiond
    # read any file it may read and write its tags beside the link).
    follow_symlinks: Literal["inside", "never", "all"] = "inside"
    existing_caption: Literal["skip", "overwrite", "append", "prepend"] = "skip"
    trigger_word: str = ""
    priority: int = Field(0, ge=-50, le=50)
    watch_mode: Literal["auto", "inotify", "polling", "scan"] = "auto"
    poll_interval_seconds: float = Field(30.0, gt=0)
    settle_seconds: float = Field(2.0, ge=0)
    image_extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_IMAGE_EXTENSIONS))

    @model_validator(mode="before")
    @classmethod
    def _name_from_the_path_as_written(cls, data: Any) -> Any:
        # The default name is the folder's name as configured (a link ~/datasets/cats
        # to /mnt/nas/2023 is "cats"), before the path is made canonical.
        if isinstance(data, dict) and not data.get("name") and data.get("path"):
            expanded = Path(os.path.expandvars(str(data["path"]))).expanduser()
            data = {**data, "name": expanded.name or "root"}
        return data

    @field_validator("path")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        # Canonical: symlinks and ".." resolved once, at start, so that every part
        # (watcher, scanner, API, CLI) sees one spelling of the root.
        return Path(os.path.realpath(Path(os.path.expandvars(str(v))).expanduser()))

    @field_validator("image_extensions")
    @classmethod
    def _norm_exts(cls, v: list[str]) -> list[str]:
        return [e.lower().lstrip(".") for e in v]

    @field_validator("generators")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one generator")
        if len(set(v)) != len(v):
            raise ValueError("a generator is listed twice")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> WatchConfig:
        if not self.name:
            self.name = self.path.name or "root"
        exts = (
            [self.sidecar_extension]
            if isinstance(self.sidecar_extension, str)
            else list((self.sidecar_extension or {}).values())
        )
        for ext in exts:
            e = ext.lstrip(".")
            if not _EXT_RE.fullmatch(e):
                raise ValueError(f"sidecar_extension {ext!r}: letters, digits, - and _ only")
            if e.lower() in self.image_extensions:
                raise ValueError(f"sidecar_extension {ext!r} is an image extension")
        if isinstance(self.sidecar_extension, str):
            self.sidecar_extension = self.sidecar_extension.lstrip(".")
        elif isinstance(self.sidecar_extension, dict):
            unknown = set(self.sidecar_extension) - set(self.generators)
            if unknown:
                raise ValueError(
                    f"sidecar_extension names generators not in this watch: {sorted(unknown)}"
                )
            self.sidecar_extension = {k: v.lstrip(".") for k, v in self.sidecar_extension.items()}
        return self

    def extension_for(self, generator: str, caption_type: str) -> str:
        """The sidecar extension of ``generator`` here: as configured; by default
        ``txt`` (what kohya, OneTrainer and diffusers read) for a folder with one
        generator, else the generator's caption type (``tags``, ``caption``...)."""
        ext = self.sidecar_extension
        if isinstance(ext, dict) and generator in ext:
            return ext[generator]
        if isinstance(ext, str):
            return ext
        if len(self.generators) == 1 and generator in self.generators:
            return "txt"
        return caption_type

    @property
    def extension_is_default(self) -> bool:
        return self.sidecar_extension is None


class QueueConfig(_Section):
    max_attempts: int = Field(5, ge=1, le=1000)
    backoff_base_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(3600.0, gt=0)
    lease_seconds: float = Field(600.0, gt=0)
    # A PASSIVE WAL checkpoint this often (0 = only SQLite's own, every 1000 pages).
    checkpoint_seconds: float = Field(60.0, ge=0)

    def queue_kwargs(self) -> dict[str, float]:
        """Keyword arguments for ``JobQueue`` (which knows nothing of configuration)."""
        return {
            "max_attempts": self.max_attempts,
            "backoff_base": self.backoff_base_seconds,
            "backoff_max": self.backoff_max_seconds,
            "lease_seconds": self.lease_seconds,
        }


class ScanConfig(_Section):
    on_start: bool = True
    interval_seconds: float = Field(3600.0, ge=0)  # periodic reconcile; 0 = never


MAX_AUTO_DECODE_WORKERS = 16  # beyond this, threads mostly wait for the GIL


class WorkerConfig(_Section):
    batch_size: int = Field(8, ge=1, le=4096)
    # Threads that read, decode and preprocess images while the model runs; 0 = one per
    # CPU this process may use (at most MAX_AUTO_DECODE_WORKERS).
    decode_workers: int = Field(0, ge=0, le=256)
    preload: list[str] = Field(default_factory=lambda: ["wd_tagger"])
    max_image_pixels: int = Field(178_956_970, ge=1)
    load_retry_seconds: float = Field(60.0, gt=0)
    # The systemd watchdog stops being fed when the worker makes no progress this long.
    stall_seconds: float = Field(600.0, gt=0)
    # One image's read + decode taking longer is given up (a hung network mount): the
    # job is retried later, its stuck thread is left behind, the others go on.
    read_timeout_seconds: float = Field(120.0, gt=0)
    # A full disk or a vanished share pauses its folder; it is probed with backoff up
    # to this long between probes, and resumes by itself when the probe succeeds.
    condition_probe_seconds: float = Field(60.0, gt=0, le=3600)

    def decode_threads(self) -> int:
        if self.decode_workers:
            return self.decode_workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, MAX_AUTO_DECODE_WORKERS))

    @model_validator(mode="after")
    def _read_timeout_below_stall(self) -> WorkerConfig:
        if self.read_timeout_seconds >= self.stall_seconds:
            raise ValueError(
                f"read_timeout_seconds ({self.read_timeout_seconds:g}) must be below "
                f"stall_seconds ({self.stall_seconds:g}): a hung read has to be given up "
                "before the watchdog restarts the daemon"
            )
        return self


MAX_KEEP_ALIVE = 366 * 86400.0
_DURATION_RE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_keep_alive(v: Any) -> Any:
    """Ollama-style keep_alive: seconds or "30s"/"5m"/"1h"; 0 = unload after the batch,
    negative = never unload. Returns seconds (-1.0 for never)."""
    if isinstance(v, str):
        m = _DURATION_RE.fullmatch(v)
        if m is None:
            raise ValueError(f"keep_alive {v!r}: write seconds, or e.g. '30s', '5m', '1h', -1")
        v = float(m.group(1)) * _UNITS[m.group(2)]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("keep_alive must be a number of seconds, or -1 for never")
        if v < 0 and v != -1:
            raise ValueError(f"keep_alive {v:g}: write -1 to keep a model loaded for ever")
        if v > MAX_KEEP_ALIVE:
            raise ValueError(f"keep_alive {v:g} s is more than a year; write -1 for never")
        return float(v)
    return v


class ModelPolicy(_Section):
    """``[residency.models.<generator>]``: per-generator residency settings."""

    keep_alive: float | None = None  # default: residency.keep_alive (heavy), -1 (light)
    memory_mb: float | None = Field(None, ge=0)  # footprint estimate before the first load
    isolate: bool | None = None  # own process; default: residency.isolate_heavy for heavy

    _keep_alive = field_validator("keep_alive", mode="before")(
        classmethod(lambda cls, v: parse_keep_alive(v))
    )


class ResidencyConfig(_Section):
    """Which models stay in memory, and how failures of a model are contained."""

    # Idle lifetime of heavy models (light ones stay warm unless set per model).
    keep_alive: float = 300.0
    max_resident_heavy: int = Field(1, ge=1)
    # Sum of resident models' footprints (GPU memory under CUDA, else RAM); 0 = no budget.
    memory_budget_mb: float = Field(0.0, ge=0)
    # A busy model is not evicted for another before it has been resident this long.
    min_resident_seconds: float = Field(60.0, ge=0)
    # Heavy models run in a child process that exits on unload (measured: bench_unload).
    isolate_heavy: bool = True
    # An image that crashes the model's process this many times ends dead (worker_crash).
    crash_attempts: int = Field(3, ge=1)
    breaker_threshold: int = Field(5, ge=1)  # consecutive load/generation failures
    breaker_cooldown_seconds: float = Field(120.0, gt=0)
    models: dict[str, ModelPolicy] = Field(default_factory=dict)

    _keep_alive = field_validator("keep_alive", mode="before")(
        classmethod(lambda cls, v: parse_keep_alive(v))
    )


class PostProcessConfig(_Section):
    steps: list[str] = Field(
        default_factory=lambda: [
            "replace_underscores",
            "collapse_spaces",
            "punctuation_spacing",
            "trim",
            "terminal_punctuation",
            "trigger_word",
        ]
    )
    case: Literal["keep", "lower", "sentence"] = "keep"
    # clean_vlm_output cuts prose to this many words at a sentence boundary; 0 = no limit
    max_words: int = Field(0, ge=0)
    # generator name -> its own list of steps
    overrides: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_steps(self) -> PostProcessConfig:
        from daemon.text.postprocess import STEPS

        for where, names in [("steps", self.steps), *self.overrides.items()]:
            unknown = [n for n in names if n not in STEPS]
            if unknown:
                raise ValueError(f"{where}: unknown steps {unknown}; known: {sorted(STEPS)}")
        return self


class ReportConfig(_Section):
    """``[report]``: the dataset report and the caption checks (issue 14)."""

    # The language prose captions should be in (the "language" check): en, de, fr, es,
    # it, pt, nl; another code turns that check off.
    language: str = "en"
    checks: bool = True  # check captions as they are written and flag contradictions
    phash: bool = True  # hash new contents perceptually in the background (near dupes)
    interval_seconds: float = Field(300.0, ge=10)  # the background pass, at most this often
    # CLIP tokenizers looked up (never downloaded) in the caches, in order
    clip_tokenizers: list[str] = Field(
        default_factory=lambda: [
            "openai/clip-vit-large-patch14",
            "openai/clip-vit-base-patch32",
            "openai/clip-vit-base-patch16",
            "openai/clip-vit-large-patch14-336",
        ]
    )


class TcpConfig(_Section):
    """Optional HTTP listener on TCP, for tools that cannot speak to a Unix socket.

    Off by default. Every request needs ``Authorization: Bearer <token>`` with the
    token read from ``token_file``, which must be owned by the daemon's user and
    have mode 0600 (the daemon refuses to start otherwise).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(7000, ge=0, le=65535)  # 0: any free port (tests)
    token_file: Path | None = None

    @field_validator("token_file")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(os.path.expandvars(str(v))).expanduser().absolute()

    @model_validator(mode="after")
    def _needs_token(self) -> TcpConfig:
        if self.enabled and self.token_file is None:
            raise ValueError("api.tcp.enabled needs api.tcp.token_file (a file with mode 0600)")
        return self


class ApiConfig(_Section):
    # Members of this group (besides root and the daemon's own user) may use the
    # mutating endpoints; anyone who can open the socket may read.
    admin_group: str | None = None
    # A synchronous caption request answers {queued: true} after this long.
    sync_wait_seconds: float = Field(30.0, ge=0)
    max_batch_items: int = Field(10_000, ge=1)
    # Settings changed through the API (caption types, generator configs, post-
    # processing, paused roots); default <state_dir>/runtime-settings.json.
    settings_file: Path | None = None
    tcp: TcpConfig = Field(default_factory=TcpConfig)

    @field_validator("settings_file")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(os.path.expandvars(str(v))).expanduser().absolute()


class UiConfig(_Section):
    """The web UI under ``/ui/`` on the socket and the TCP listener."""

    enabled: bool = True
    # Thumbnails kept under <cache_dir>/thumbnails (least recently used removed first).
    thumbnail_cache_mb: int = Field(256, ge=1)
    # Host names (besides loopback ones) a browser may use to reach the socket's UI,
    # e.g. through a reverse proxy: a guard against DNS rebinding.
    allowed_hosts: list[str] = Field(default_factory=list)


def _default_state_dir() -> Path:
    if d := os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(d.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return Path(base).expanduser() / "captiond"


def _default_cache_dir() -> Path:
    if d := os.environ.get("CACHE_DIRECTORY"):
        return Path(d.split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "captiond"


class _EnvSource(EnvSettingsSource):
    """``CAPTIOND_*`` variables; a list may also be written comma-separated
    (``CAPTIOND_WORKER__PRELOAD=wd_tagger,vlm``), not only as JSON."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            if isinstance(value, str) and get_origin(field.annotation) is list:
                return [v.strip() for v in value.split(",") if v.strip()]
            raise


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CAPTIOND_", env_nested_delimiter="__", extra="forbid"
    )

    state_dir: Path = Field(default_factory=_default_state_dir)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    socket_path: Path | None = None  # default: $RUNTIME_DIRECTORY/captiond.sock or state_dir
    socket_mode: int = 0o660
    socket_group: str | None = None  # group that may use the socket (mode 0660)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    watch: list[WatchConfig] = Field(default_factory=list)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    residency: ResidencyConfig = Field(default_factory=ResidencyConfig)
    postprocess: PostProcessConfig = Field(default_factory=PostProcessConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    ui: UiConfig = Field(default_factory=UiConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    # generator name -> its settings table, validated against the generator's schema
    generators: dict[str, dict[str, Any]] = Field(default_factory=dict)

    # Set by load_settings(); not config keys.
    source: str = Field("", exclude=True)
    notes: list[str] = Field(default_factory=list, exclude=True)  # e.g. a file skipped

    @field_validator("state_dir", "cache_dir", "socket_path")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(os.path.expandvars(str(v))).expanduser().absolute()

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, v: Any) -> Any:
        if isinstance(v, str):  # "0660" or "660" from the environment: octal
            try:
                return int(v, 8)
            except ValueError:
                raise ValueError("write the mode in octal, e.g. 0o660") from None
        if isinstance(v, int) and not 0 <= v <= 0o777:
            raise ValueError("write the mode in octal, e.g. 0o660 (not 660)")
        return v

    @model_validator(mode="after")
    def _check_watches(self) -> Settings:
        names = [w.name for w in self.watch]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"watch names must be unique; repeated: {sorted(dup)}")
        for a in self.watch:
            for b in self.watch:
                if a is not b and b.path.is_relative_to(a.path):
                    raise ValueError(
                        f"watch {b.name!r} ({b.path}) lies inside watch {a.name!r} ({a.path}); "
                        "watched folders may not overlap"
                    )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file; the file's contents arrive as init kwargs.
        return (_EnvSource(settings_cls), init_settings)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    def resolved_socket_path(self) -> Path:
        """Where the daemon listens."""
        if self.socket_path is not None:
            return self.socket_path
        if d := os.environ.get("RUNTIME_DIRECTORY"):
            return Path(d.split(":")[0]) / "captiond.sock"
        return self.state_dir / "captiond.sock"

    def client_socket_paths(self) -> list[Path]:
        """Where a client looks, in order: the daemon may run under systemd (system or
        user service, socket in its RuntimeDirectory) while the CLI does not."""
        if self.socket_path is not None:
            return [self.socket_path]
        paths = [self.resolved_socket_path(), Path("/run/captiond/captiond.sock")]
        if xdg := os.environ.get("XDG_RUNTIME_DIR"):
            paths.append(Path(xdg) / "captiond" / "captiond.sock")
        paths.append(self.state_dir / "captiond.sock")
        return list(dict.fromkeys(paths))

    def watch_for(self, path: str) -> WatchConfig | None:
        """The watch whose folder holds ``path`` (absolute)."""
        for w in self.watch:  # folders never overlap (validated), so at most one matches
            root = str(w.path).rstrip("/")
            if path == root or path.startswith(root + "/"):
                return w
        return None

    @property
    def db_path(self) -> Path:
        return self.state_dir / "captiond.db"

    @property
    def runtime_settings_path(self) -> Path:
        return self.api.settings_file or self.state_dir / "runtime-settings.json"


def find_config_file(
    explicit: str | os.PathLike[str] | None = None, notes: list[str] | None = None
) -> Path | None:
    """The config file to use, by the documented order; None when there is none.

    ``./config.toml`` is skipped when it is not captiond's (a trainer's config in a
    dataset folder: TOML whose top-level keys are not captiond's); why is appended to
    ``notes``. An explicit file (``--config``, ``$CAPTIOND_CONFIG``) is always used."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("CAPTIOND_CONFIG"):
        return Path(env)
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser()
    for candidate in (
        Path("config.toml"),
        xdg / "captiond" / "config.toml",
        Path("/etc/captiond/config.toml"),
    ):
        if not candidate.is_file():
            continue
        if candidate == Path("config.toml") and (why := _foreign(candidate)):
            if notes is not None:
                notes.append(f"skipped {candidate.absolute()}: {why}")
            continue
        return candidate
    return None


def _foreign(path: Path) -> str:
    """Why ``path`` is not a captiond configuration ("" when it may be one)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return ""  # a broken captiond file gets its own clear error later
    ours = set(Settings.model_fields) - {"source"}
    unknown = sorted(set(data) - ours)
    if unknown and not set(data) & ours:
        return f"not a captiond configuration (keys {', '.join(unknown[:5])})"
    return ""


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = _loc(tuple(p for p in e["loc"] if p not in ("function-after",)))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def load_settings(
    path: str | os.PathLike[str] | None = None, *, extra_watches: Sequence[Path] = ()
) -> Settings:
    """Read, merge and validate the configuration. Raises ConfigError.

    ``extra_watches`` adds folders with default settings (``captiond run --watch``).
    """
    notes: list[str] = []
    file = find_config_file(path, notes)
    data: dict[str, Any] = {}
    source = "defaults"
    if file is not None:
        source = str(file)
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if extra_watches:
        watches = [*data.get("watch", []), *({"path": str(p)} for p in extra_watches)]
        data = {**data, "watch": watches}
    if any(k.startswith("CAPTIOND_") and k != "CAPTIOND_CONFIG" for k in os.environ):
        source += " (+ CAPTIOND_* environment)"
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        # Every problem at once: the field errors, and what the later checks find in
        # the parts that are valid on their own (overlapping watches, generator names).
        lines = format_validation_error(source, exc).splitlines()
        lines += [line for line in _partial_checks(data, source) if line not in lines]
        raise ConfigError("\n".join(lines)) from None
    except SettingsError as exc:
        raise ConfigError(f"{source}: {_env_error(exc)}") from None
    settings.source = source
    settings.notes = notes
    _check_generators(settings)
    return settings


def _env_error(exc: SettingsError) -> str:
    text = str(exc)
    name = text.split('"')[1] if text.count('"') >= 2 else "an environment variable"
    return (
        f"CAPTIOND_{name.upper().replace('.', '__')}: cannot read its value ({text}); "
        'write lists as JSON (\'["a", "b"]\') or comma-separated (a,b)'
    )


def _partial_checks(data: dict[str, Any], source: str) -> list[str]:
    """Checks that need a valid Settings, run on whatever validates on its own."""
    watches = []
    for item in data.get("watch", []) if isinstance(data.get("watch"), list) else []:
        try:
            watches.append(WatchConfig.model_validate(item))
        except (ValidationError, TypeError):
            continue
    out = []
    try:
        Settings.model_construct(watch=watches)._check_watches()
    except ValueError as exc:
        out.append(f"{source}: watch: {exc}")
    gens = data.get("generators") if isinstance(data.get("generators"), dict) else {}
    try:
        partial = Settings.model_construct(
            watch=watches,
            generators=gens,
            worker=WorkerConfig.model_construct(preload=[]),
            residency=ResidencyConfig.model_construct(models={}),
            source=source,
        )
        _check_generators(partial)
    except ConfigError as exc:
        out += str(exc).splitlines()
    except Exception:  # the partial view was too broken to check: the field errors say it
        pass
    return out


def _check_generators(settings: Settings) -> None:
    """Validate generator tables against each generator's schema and watch references."""
    from daemon.generators.registry import USE_KEY, discover

    plain = discover()
    known = discover_generators(settings)
    problems: list[str] = []
    for name, table in settings.generators.items():
        base = table.get(USE_KEY)
        if base is None:
            continue
        if name in plain:
            problems.append(f"generators.{name}.use: {name} is a generator itself; pick a new name")
        elif base not in plain:
            problems.append(f"generators.{name}.use: unknown generator {base!r}")
    caption_types: dict[str, str] = {}  # from instances: settings may change the type
    for name, found in known.items():
        if found.cls is None:
            continue  # reported as unavailable at run time
        if name in settings.generators or any(name in w.generators for w in settings.watch):
            try:
                config = generator_config(settings, name, found.cls)
            except ValidationError as exc:
                for e in exc.errors():
                    problems.append(f"generators.{name}.{_loc(e['loc'])}: {e['msg']}")
                continue
            caption_types[name] = found.cls(config).caption_type
    for name in settings.generators:
        if name not in known:
            problems.append(f"generators.{name}: unknown generator (known: {sorted(known)})")
    for i, w in enumerate(settings.watch):
        for g in w.generators:
            if g not in known:
                problems.append(f"watch[{i}].generators: unknown generator {g!r}")
        exts = [w.extension_for(g, caption_types.get(g, g)) for g in w.generators]
        if len(set(exts)) != len(exts):
            problems.append(
                f"watch[{i}].sidecar_extension: two generators would write the same "
                f"sidecar extension {exts}; give each its own"
            )
    for g in settings.worker.preload:
        if g not in known:
            problems.append(f"worker.preload: unknown generator {g!r}")
    for g in settings.residency.models:
        if g not in known:
            problems.append(f"residency.models: unknown generator {g!r}")
    if problems:
        raise ConfigError("\n".join(f"{settings.source}: {p}" for p in problems))


def generator_config(settings: Settings, name: str, cls: type) -> Any:
    """The validated settings object for one generator (or named instance)."""
    table = {k: v for k, v in settings.generators.get(name, {}).items() if k != "use"}
    return cls.config_model(**table)


def discover_generators(settings: Settings) -> dict[str, Any]:
    """Built-in and plug-in generators plus the named instances of this configuration."""
    from daemon.generators.registry import discover, with_instances

    return with_instances(discover(), settings.generators)
