"""The ``captiond`` command line."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from daemon import __version__
from daemon.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from daemon.client import Client


def _settings(ctx: click.Context, extra_watches: tuple[Path, ...] = ()) -> Settings:
    try:
        settings = load_settings(ctx.obj["config"], extra_watches=extra_watches)
    except ConfigError as exc:
        click.echo(f"captiond: invalid configuration\n{exc}", err=True)
        ctx.exit(2)
    if not ctx.obj.get("noted"):
        ctx.obj["noted"] = True
        for note in settings.notes:  # e.g. a trainer's ./config.toml skipped
            click.echo(f"captiond: {note}; using {settings.source}", err=True)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CAPTIOND_CONFIG",
    help="Config file. Default: ./config.toml, $XDG_CONFIG_HOME/captiond/config.toml, "
    "/etc/captiond/config.toml (first found). Also $CAPTIOND_CONFIG.",
)
@click.version_option(__version__, prog_name="captiond")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """captiond: watch image dataset folders and write caption sidecars.

    CAPTIOND_* environment variables override config keys; use __ for nesting,
    e.g. CAPTIOND_WORKER__BATCH_SIZE=4.
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@main.command()
@click.option(
    "--watch",
    "-w",
    "extra",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also watch this folder with the default settings (repeatable).",
)
@click.pass_context
def run(ctx: click.Context, extra: tuple[Path, ...]) -> None:
    """Run the daemon in the foreground, exactly as systemd runs it."""
    settings = _settings(ctx, extra)
    from daemon.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if not settings.watch:
        click.echo(
            f"captiond: no folders to watch: add a [[watch]] table to {settings.source} "
            "or pass --watch DIR",
            err=True,
        )
        ctx.exit(2)
    from daemon.api.listeners import SocketPathError
    from daemon.app import Daemon
    from daemon.queue.db import DatabaseError
    from daemon.report.tokens import encode_on_the_callers_thread
    from daemon.residency.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before the threads: each would keep its freed buffers
    encode_on_the_callers_thread()  # the niced facts pass stays niced
    try:
        code = Daemon(settings).run_forever()
    except (SocketPathError, DatabaseError, OSError) as exc:
        click.echo(f"captiond: cannot start: {exc}", err=True)
        ctx.exit(1)
    ctx.exit(code)


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and print it with every default filled in."""
    from daemon.overrides import Overrides

    settings = _settings(ctx)
    click.echo(f"# {settings.source}: OK")
    data = settings.model_dump(mode="json")
    data["socket_mode"] = oct(settings.socket_mode)  # as written in the file: 0o660
    click.echo(json.dumps(data, indent=2))
    active = Overrides.load(settings.runtime_settings_path).active()
    if active:
        click.echo(
            f"# overridden through the API ({settings.runtime_settings_path}); "
            "`captiond config reset` drops them:"
        )
        for section, keys in active.items():
            click.echo(f"#   {section}: {', '.join(keys)}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the running daemon's queue, generators, watchers and recent errors."""
    body = api_call("GET", "/status")(ctx)
    click.echo(json.dumps(body, indent=2) if as_json else format_status(body))


def _client(ctx: click.Context) -> Client:
    from daemon.client import Client

    return Client(_settings(ctx))


def _fail(ctx: click.Context, exc: Exception) -> None:
    click.echo(f"captiond: {exc}", err=True)
    ctx.exit(1)


def _out(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human(data))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[[("" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def api_call(method: str, url: str, body: Any = None) -> Callable[[click.Context], Any]:
    def run(ctx: click.Context) -> Any:
        from daemon.client import ClientError

        try:
            return _client(ctx).call(method, url, body)
        except ClientError as exc:
            _fail(ctx, exc)

    return run


@main.command()
@json_option
@click.pass_context
def generators(ctx: click.Context, as_json: bool) -> None:
    """List generators: caption type, weight, availability, model state."""
    data = api_call("GET", "/api/generators")(ctx)

    def human(d: dict[str, Any]) -> str:
        rows = [
            [
                g.get("name"),
                g.get("caption_type"),
                g.get("weight"),
                g.get("state") or ("loaded" if g.get("loaded") else "-"),
                "yes" if g.get("available") else f"no: {g.get('reason', '')}",
            ]
            for g in d.get("generators", [])
        ]
        return _table(rows, ["name", "type", "weight", "state", "available"])

    _out(data, as_json, human)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--generator", "-g", help="Generator to run (default: the folder's first).")
@click.option(
    "--redo",
    is_flag=True,
    help="Make captiond's own captions again (those nobody edited); a person's stay.",
)
@click.option(
    "--overwrite",
    "--force",
    "overwrite",
    is_flag=True,
    help="Replace every caption, a person's too (asks first on a terminal).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask before --overwrite.")
@click.option("--no-post-process", is_flag=True, help="Write the generator's raw output.")
@click.option("--timeout", type=float, help="Stop waiting after this many seconds.")
@click.option(
    "--once",
    is_flag=True,
    help="No daemon: run the pipeline in this process over one folder, then exit.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --once: keep the run's state here (default: one per folder under "
    "$XDG_STATE_HOME/captiond/once).",
)
@click.option(
    "--fresh", is_flag=True, help="With --once: a throw-away state (forget earlier runs)."
)
@click.option("--ext", help="With --once: sidecar extension (default: txt).")
@click.option("--general-threshold", type=float, help="With --once: WD general tag threshold.")
@click.option("--character-threshold", type=float, help="With --once: WD character threshold.")
@click.option("--undesired-tags", help="With --once: comma-separated tags never to write.")
@click.option("--trigger-word", help="With --once: put this first in every caption.")
@click.option(
    "--existing",
    type=click.Choice(["skip", "overwrite", "append", "prepend"]),
    help="With --once: what to do with a caption captiond did not write.",
)
@click.option("--batch-size", type=click.IntRange(1, 4096), help="With --once: images per batch.")
@json_option
@click.pass_context
def caption(ctx: click.Context, paths: tuple[Path, ...], **opts: Any) -> None:
    """Caption images or folders now, at the highest priority, with a progress bar.

    Without --once the running daemon does the work (PATHS must be in watched folders);
    with --once this process does it for one folder and exits (1 if any image failed).
    By default a caption already there is left alone; --redo makes captiond's own
    again, --overwrite replaces every caption, a person's too.
    """
    if opts["overwrite"] and not opts["yes"] and sys.stdin.isatty():
        click.confirm(
            "--overwrite replaces captions a person wrote or edited too. Continue?",
            abort=True,
            err=True,
        )
    if opts["once"]:
        _caption_once(ctx, paths, opts)
    else:
        once_only = [
            k for k in ("ext", "general_threshold", "character_threshold", "undesired_tags",
                        "trigger_word", "existing", "batch_size", "state_dir")
            if opts.get(k) is not None
        ] + (["fresh"] if opts["fresh"] else [])  # fmt: skip
        if once_only:
            click.echo(
                f"captiond: --{once_only[0].replace('_', '-')} goes with --once; the daemon uses "
                "the folder's settings (config.toml)",
                err=True,
            )
            ctx.exit(2)
        _caption_daemon(ctx, paths, opts)


LEFT_ALONE = {
    "caption_exists": "a caption captiond did not write is there (--overwrite replaces it)",
    "caption_edited": "edited by a person after captiond wrote it (--overwrite replaces it)",
}


def _caption_daemon(ctx: click.Context, paths: tuple[Path, ...], opts: dict[str, Any]) -> None:
    from daemon.client import ClientError, ClientTimeout, api_path

    client = _client(ctx)
    items: list[str] = []
    folders: list[str] = []
    try:
        roots = client.call("GET", "/api/roots").get("roots", [])  # as the daemon sees them
        for p in paths:
            name = api_path(roots, p)
            (folders if p.is_dir() else items).append(name)
        body = {
            "items": items,
            "folders": folders,
            "generator": opts["generator"],
            "config": {
                "force": opts["overwrite"],
                "redo": opts["redo"],
                "post_process": not opts["no_post_process"],
            },
        }
        results: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        total = 0
        deadline = None if opts["timeout"] is None else time.monotonic() + opts["timeout"]
        with click.progressbar(length=1, label="captioning", file=sys.stderr, show_pos=True) as bar:
            try:
                for event in client.stream("/api/batch-generate-captions", body, deadline):
                    kind = event.get("type")
                    if kind == "start":
                        total = bar.length = max(1, event.get("total", 0))
                    elif kind == "item_complete":
                        results.append(event["item_result"])
                        bar.update(1)
                    elif kind == "waiting":
                        click.echo(f"\nwaiting: {event.get('message')}", err=True)
                    elif kind == "complete":
                        summary = event
            except (ClientTimeout, KeyboardInterrupt) as exc:
                why = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else f"{opts['timeout']:g} s"
                click.echo(
                    f"\nstopped waiting ({why}): {len(results)} of {total} done; the daemon "
                    "cancelled the images not started (queued ones it captions anyway when "
                    "their folder is watched)",
                    err=True,
                )
                ctx.exit(1)
        if not summary or len(results) != total:
            raise ClientError(
                f"the daemon stopped answering after {len(results)} of {total} images"
            )
    except ClientError as exc:
        _fail(ctx, exc)
    failed = [r for r in results if not r.get("success") and not r.get("skipped")]
    skipped = [r for r in results if r.get("skipped")]
    if opts["as_json"]:
        click.echo(json.dumps({"summary": summary, "results": results}, indent=2))
    else:
        click.echo(
            f"{summary.get('successful', 0)} captioned, {summary.get('skipped', 0)} left alone, "
            f"{summary.get('failed', 0)} failed"
        )
        for r in skipped[:10]:
            if r.get("ours"):
                why = "captiond's own caption is there (--redo makes it again)"
            else:
                why = LEFT_ALONE.get(r.get("error_type", ""), r.get("error", ""))
            click.echo(f"  left alone: {r.get('path')}: {why}")
        if len(skipped) > 10:
            click.echo(f"  ... and {len(skipped) - 10} more left alone")
        for r in failed:
            click.echo(f"  {r.get('path')}: {r.get('error_type')}: {r.get('error')}")
    ctx.exit(1 if failed else 0)


def _caption_once(ctx: click.Context, paths: tuple[Path, ...], opts: dict[str, Any]) -> None:
    from daemon.logs import configure_logging
    from daemon.oneshot import OnceOptions, run_once

    if len(paths) != 1 or not paths[0].is_dir():
        click.echo("captiond: --once takes one folder", err=True)
        ctx.exit(2)
    if opts["no_post_process"]:
        click.echo("captiond: --no-post-process needs the daemon (omit --once)", err=True)
        ctx.exit(2)
    if opts["timeout"] is not None:
        click.echo("captiond: --timeout goes with the daemon (--once runs to the end)", err=True)
        ctx.exit(2)
    settings = _settings(ctx)
    configure_logging("warning", "console")  # a person is watching: no JSON on stderr
    tagger: dict[str, Any] = {}
    for key in ("general_threshold", "character_threshold"):
        if opts[key] is not None:
            tagger[key] = opts[key]
    if opts["undesired_tags"]:
        tagger["undesired_tags"] = [
            t.strip() for t in opts["undesired_tags"].split(",") if t.strip()
        ]
    options = OnceOptions(
        ext=opts["ext"],
        trigger_word=opts["trigger_word"],
        existing=opts["existing"],
        batch_size=opts["batch_size"],
        tagger=tagger,
    )
    with click.progressbar(length=1, label="captioning", file=sys.stderr, show_pos=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        try:
            result = run_once(
                settings,
                paths[0],
                generator=opts["generator"],
                redo=opts["redo"],
                overwrite=opts["overwrite"],
                state_dir=opts["state_dir"],
                fresh=opts["fresh"],
                options=options,
                progress=progress,
            )
        except ValueError as exc:
            click.echo(f"captiond: {exc}", err=True)
            ctx.exit(2)
    if opts["as_json"]:
        click.echo(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        outs = ", ".join(f"{n} {k}" for k, n in sorted(result.outcomes.items()))
        click.echo(
            f"{result.total} images in {result.seconds:.1f}s: "
            f"{outs or 'nothing new to do'}, {result.failed} failed"
        )
        for e in result.left_alone[:10]:
            click.echo(f"  left alone: {e['path']}: {e['reason']}")
        if len(result.left_alone) > 10:
            click.echo(f"  ... and {len(result.left_alone) - 10} more left alone")
        for e in result.errors:
            click.echo(f"  {e['path']}: {e['error_type']}: {e['error']}")
        if result.model_error:
            click.echo(f"stopped: the model cannot run: {result.model_error}", err=True)
    ctx.exit(1 if result.failed or result.model_error else 0)


@main.command()
@click.argument("roots", nargs=-1)
@click.option(
    "--ray",
    "ray_address",
    default="local",
    show_default=True,
    help="local (start Ray here), auto (join the cluster this host is in) or ADDRESS.",
)
@click.option("--actors", type=click.IntRange(min=1), help="Actors (default: one per GPU).")
@click.option(
    "--gpus-per-actor", type=click.FloatRange(min=0), help="Default: 1 with GPUs, else 0."
)
@click.option("--cpus-per-actor", type=click.FloatRange(min=0.1), default=1.0, show_default=True)
@click.option("--generator", "-g", help="Generator to run (default: the folders' first).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per model call.")
@click.option("--limit", type=click.IntRange(min=1), help="Take at most this many jobs.")
@click.option(
    "--chunk-size", type=click.IntRange(min=1), default=256, show_default=True,
    help="Jobs leased, planned and sent to an actor together.",
)  # fmt: skip
@click.option(
    "--path-map",
    "path_maps",
    multiple=True,
    metavar="[NODE:]FROM=TO",
    help="The share under FROM here is under TO on the nodes (or on NODE). Repeatable.",
)
@click.option(
    "--time-limit", type=click.FloatRange(min=1), default=48 * 3600.0, show_default=True,
    help="Stop after this many seconds (what is done stays done).",
)  # fmt: skip
@click.option(
    "--stall-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
    help="Stop when no image finished for this many seconds.",
)  # fmt: skip
@json_option
@click.pass_context
def backfill(ctx: click.Context, roots: tuple[str, ...], **kw: Any) -> None:
    """Caption the daemon's pending jobs on a Ray cluster (ROOTS: watch names or folders
    in them; default all), recorded in the daemon's queue and index. Run it on the
    daemon's host; the daemon may keep running."""
    from daemon.backfill import ray_missing

    if hint := ray_missing():
        click.echo(f"captiond: {hint}", err=True)
        ctx.exit(2)
    from daemon.backfill.cli import run_backfill

    ctx.exit(run_backfill(_settings(ctx), roots, **kw))


@main.group("config")
def config_group() -> None:
    """Read or change a generator's settings in the running daemon (persisted)."""


@config_group.command("get")
@click.argument("generator", required=False)
@json_option
@click.pass_context
def config_get(ctx: click.Context, generator: str | None, as_json: bool) -> None:
    """Show generators' settings (all, or GENERATOR's)."""
    data = api_call("GET", "/api/generators")(ctx)
    gens = {g["name"]: g for g in data.get("generators", [])}
    if generator is not None:
        if generator not in gens:
            _fail(ctx, ValueError(f"unknown generator {generator!r}"))
        gens = {generator: gens[generator]}
    if as_json:  # {generator: its settings}; which are overrides: /api/generators
        click.echo(json.dumps({n: g.get("config") for n, g in gens.items()}, indent=2))
        return
    for name, g in gens.items():
        click.echo(f"[generators.{name}]")
        overridden = set(g.get("overrides") or [])
        for key, value in (g.get("config") or {}).items():
            line = f"{key} = {_toml(value)}" if value is not None else f"# {key} = (not set)"
            if key in overridden:
                line += f"  # set through the API (captiond config reset {name} {key})"
            click.echo(line)
        click.echo("")


@config_group.command("set")
@click.argument("generator")
@click.argument("assignments", nargs=-1, required=True)
@json_option
@click.pass_context
def config_set(
    ctx: click.Context, generator: str, assignments: tuple[str, ...], as_json: bool
) -> None:
    """Change settings: captiond config set wd_tagger general_threshold=0.4 rating=first

    Values are read as JSON when they parse (numbers, true, lists), else as text.
    """
    changes: dict[str, Any] = {}
    for a in assignments:
        key, sep, raw = a.partition("=")
        if not sep or not key:
            click.echo(f"captiond: {a!r}: write KEY=VALUE", err=True)
            ctx.exit(2)
        try:
            changes[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key.strip()] = raw
    data = api_call("PUT", f"/api/captioner-config/{generator}", changes)(ctx)
    _out(data, as_json, lambda d: f"{generator}: updated ({', '.join(changes)})")


@config_group.command("reset")
@click.argument("generator", required=False)
@click.argument("key", required=False)
@json_option
@click.pass_context
def config_reset(ctx: click.Context, generator: str | None, key: str | None, as_json: bool) -> None:
    """Drop settings changed through the API: all of them, GENERATOR's (or
    "postprocess"), or one KEY of it. config.toml applies again, at once."""
    from urllib.parse import quote

    url = f"/api/captioner-config/{quote(generator or '_all', safe='')}"
    if key:
        url += f"?key={quote(key, safe='')}"
    data = api_call("DELETE", url)(ctx)
    _out(
        data,
        as_json,
        lambda d: "dropped: " + (", ".join(d.get("dropped", [])) or "nothing was overridden"),
    )


def _toml(value: Any) -> str:
    """A value as TOML writes it (json.dumps is TOML for strings, numbers and lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


@main.command()
@click.option("--add", "add", multiple=True, help="Recognise another sidecar extension.")
@click.option("--remove", "remove", multiple=True, help="Forget a user-added extension.")
@json_option
@click.pass_context
def types(ctx: click.Context, add: tuple[str, ...], remove: tuple[str, ...], as_json: bool) -> None:
    """List the recognised sidecar extensions; --add/--remove change them (persisted)."""
    data = api_call("GET", "/api/caption-types")(ctx)
    for t in remove:
        t = t.lstrip(".")
        if t in data.get("required", []):
            _fail(ctx, ValueError(f".{t} is in use by a generator or folder; it cannot be removed"))
        if t not in data.get("user", []):
            _fail(ctx, ValueError(f".{t} is not a recognised extension added by hand"))
    if add or remove:
        user = [t for t in data.get("user", []) if t not in {r.lstrip(".") for r in remove}]
        user += list(add)
        data = api_call("POST", "/api/caption-types", {"types": user})(ctx)
    _out(data, as_json, lambda d: " ".join(f".{t}" for t in d.get("types", [])))


def _queue_command(name: str, doc: str, with_root: bool = True) -> None:
    @main.command(name, help=doc)
    @click.argument("root", required=False)
    @json_option
    @click.pass_context
    def command(ctx: click.Context, root: str | None, as_json: bool) -> None:
        data = api_call("POST", f"/api/queue/{name}", {"root": root} if root else {})(ctx)
        _out(data, as_json, lambda d: f"{name}: ok" + (f" ({root})" if root else ""))


_queue_command("pause", "Stop claiming jobs (all folders, or ROOT's). Running work finishes.")
_queue_command("resume", "Claim jobs again (all folders, or ROOT's).")


@main.command()
@click.argument("root", required=False)
@click.option(
    "--recaption",
    is_flag=True,
    help="Also re-caption images whose sidecar captiond wrote and nobody edited.",
)
@json_option
@click.pass_context
def rescan(ctx: click.Context, root: str | None, recaption: bool, as_json: bool) -> None:
    """Reconcile a folder (or all) with the index now."""
    body: dict[str, Any] = {"recaption": recaption} | ({"root": root} if root else {})
    data = api_call("POST", "/api/queue/rescan", body)(ctx)
    _out(data, as_json, lambda d: "rescan requested")


def _state_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--root", help="Only jobs under this watched folder.")(fn)
    fn = click.option("--generator", "-g", help="Only this generator's jobs.")(fn)
    return fn


@main.command()
@_state_options
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["failed", "dead"]),
    default=("failed", "dead"),
    show_default=True,
)
@json_option
@click.pass_context
def retry(ctx, root, generator, states, as_json) -> None:  # type: ignore[no-untyped-def]
    """Queue failed or dead jobs again."""
    body = {"root": root, "generator": generator, "states": list(states)}
    data = api_call("POST", "/api/queue/retry", body)(ctx)
    _out(data, as_json, lambda d: f"{d.get('count', 0)} jobs queued again")


@main.command()
@_state_options
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["pending", "done", "failed", "dead"]),
    required=True,
)
@json_option
@click.pass_context
def purge(ctx, root, generator, states, as_json) -> None:  # type: ignore[no-untyped-def]
    """Delete jobs in these states (never running ones); captions stay on disk."""
    body = {"root": root, "generator": generator, "states": list(states)}
    data = api_call("POST", "/api/queue/purge", body)(ctx)
    _out(data, as_json, lambda d: f"{d.get('count', 0)} jobs deleted")


@main.group()
def models() -> None:
    """List, load, unload or pre-download models."""


@models.command("list")
@json_option
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """Models in memory or loading, most recently used first."""
    data = api_call("GET", "/api/models")(ctx)

    def human(d: dict[str, Any]) -> str:
        rows = [
            [
                m.get("name"),
                m.get("state"),
                m.get("weight"),
                m.get("memory_mb"),
                m.get("idle_seconds"),
                m.get("unload_in_seconds"),
            ]
            for m in d.get("models", [])
        ]
        if not rows:
            return "no model in memory"
        return _table(rows, ["name", "state", "weight", "memory MB", "idle s", "unload in s"])

    _out(data, as_json, human)


@models.command("load")
@click.argument("generator")
@click.option("--keep-alive", type=float, help="Seconds to keep it; -1 = until unloaded.")
@click.option("--wait", is_flag=True, help="Return when the model is loaded.")
@json_option
@click.pass_context
def models_load(
    ctx: click.Context, generator: str, keep_alive: float | None, wait: bool, as_json: bool
) -> None:
    """Load GENERATOR's model now."""
    body: dict[str, Any] = {"wait": wait}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    data = api_call("POST", f"/api/models/{generator}/load", body)(ctx)
    _out(data, as_json, lambda d: f"{generator}: {d.get('state')}")


@models.command("unload")
@click.argument("generator")
@json_option
@click.pass_context
def models_unload(ctx: click.Context, generator: str, as_json: bool) -> None:
    """Unload GENERATOR's model (after its running batch)."""
    data = api_call("POST", f"/api/models/{generator}/unload")(ctx)
    _out(data, as_json, lambda d: f"{generator}: {d.get('state')}")


@models.command("pull")
@click.argument("generator")
@click.pass_context
def models_pull(ctx: click.Context, generator: str) -> None:
    """Download GENERATOR's model into the cache now, for machines offline later.

    Works without a daemon; uses [generators.NAME] from the configuration.
    """
    from daemon.config import discover_generators, generator_config
    from daemon.errors import CaptionError

    settings = _settings(ctx)
    found = discover_generators(settings).get(generator)
    if found is None or found.cls is None:
        _fail(ctx, ValueError(found.error if found else f"unknown generator {generator!r}"))
        return
    gen = found.cls(generator_config(settings, generator, found.cls), cache_dir=settings.cache_dir)
    try:
        where = gen.fetch()
    except CaptionError as exc:
        _fail(ctx, exc)
        return
    click.echo(f"{generator}: {where}")


@main.command()
@click.option("--limit", default=20, show_default=True, help="How many.")
@json_option
@click.pass_context
def logs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Recent errors: failed and dead jobs, newest first."""
    data = api_call("GET", "/status")(ctx)
    errors = data.get("recent_errors", [])[:limit]

    def human(errs: list[dict[str, Any]]) -> str:
        if not errs:
            return "no recent errors"
        return "\n".join(
            f"[{e['state']}] {e['error_type']}: {e['path']} ({e['generator']}): {e['error']}"
            for e in errs
        )

    _out(errors, as_json, human)


@main.command()
@click.argument("scopes", nargs=-1)
@json_option
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report as one standalone HTML page with plots.",
)
@click.option(
    "--refresh",
    is_flag=True,
    help="First read the caption files back (disk): texts a person edited since.",
)
@click.option(
    "--resolution",
    type=int,
    default=1024,
    show_default=True,
    help="Training resolution: buckets and the 'below' count use resolution².",
)
@click.option("--bucket-step", type=int, default=64, show_default=True)
@click.option("--min-bucket", type=int, help="Smallest bucket side [min(256, resolution)].")
@click.option("--max-bucket", type=int, help="Largest bucket side [2 x resolution].")
@click.option(
    "--near-distance",
    type=int,
    default=4,
    show_default=True,
    help="pHash bits near duplicates may differ in (0-16).",
)
@click.option("--top", type=int, default=50, show_default=True, help="Rows of long tables.")
@click.option("--trigger", help="The trigger word (default: each watched folder's).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="No daemon: read this state directory's database (e.g. of caption --once).",
)
@click.pass_context
def report(  # type: ignore[no-untyped-def]
    ctx, scopes, as_json, html_file, refresh, resolution, bucket_step, min_bucket, max_bucket,
    near_distance, top, trigger, state_dir,
) -> None:  # fmt: skip
    """What is in a dataset: coverage, tags, caption length, image sizes, buckets,
    duplicates and the caption flags to review.

    SCOPES: watched roots by name, folders in them (ROOT/sub or a path); default all.
    The report reads captiond's index, not the disk (--refresh reads the captions back).
    """
    options: dict[str, Any] = {"resolution": resolution, "bucket_step": bucket_step,
                               "near_distance": near_distance, "top": top}  # fmt: skip
    if min_bucket is not None:
        options["min_bucket"] = min_bucket
    if max_bucket is not None:
        options["max_bucket"] = max_bucket
    if trigger is not None:
        options["trigger"] = trigger
    if state_dir is not None:
        data = _report_offline(ctx, scopes, options, refresh, state_dir)
    else:
        data = _report_daemon(ctx, scopes, options, refresh)
    if html_file is not None:
        from daemon.report.html import render

        try:
            html_file.write_text(render(data), encoding="utf-8")
        except OSError as exc:
            _fail(ctx, exc)
        click.echo(f"wrote {html_file}", err=True)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        from daemon.report.text import format_report

        click.echo(format_report(data))


def _report_scopes(ctx: click.Context, scopes: tuple[str, ...]) -> list[str]:
    """API names of the scopes: ``ROOT`` or ``ROOT/sub`` as they are, folders on disk
    turned into those (a name that is both means the watched root's folder)."""
    from daemon.report.service import ScopeError, scope_for_path

    settings = _settings(ctx)
    roots = {w.name for w in settings.watch}
    out = []
    for sc in scopes:
        named = not sc.startswith(("/", ".", "~")) and sc.split("/")[0] in roots | {"_"}
        if not named and Path(sc).expanduser().is_dir():
            try:
                sc = scope_for_path(settings, Path(sc).expanduser())
            except ScopeError as exc:
                raise click.UsageError(str(exc)) from None
        out.append(sc)
    return out


def _report_daemon(
    ctx: click.Context, scopes: tuple[str, ...], options: dict[str, Any], refresh: bool
) -> dict[str, Any]:
    from urllib.parse import urlencode

    names = _report_scopes(ctx, scopes)
    if refresh:
        counts = api_call("POST", "/api/report/refresh", {"scopes": names})(ctx)
        click.echo(_refreshed(counts), err=True)
    query = urlencode([("scope", n) for n in names] + list(options.items()))
    return api_call("GET", "/api/report" + (f"?{query}" if query else ""))(ctx)


def _refreshed(c: dict[str, int]) -> str:
    return (
        f"read back {c.get('sidecars', 0)} caption files: {c.get('edited', 0)} edited since "
        f"captiond wrote them, {c.get('missing', 0)} missing, {c.get('refused', 0)} not read "
        f"(links, special or over 1 MiB), {c.get('not_utf8', 0)} not UTF-8"
    )


def _report_offline(
    ctx: click.Context,
    scopes: tuple[str, ...],
    options: dict[str, Any],
    refresh: bool,
    state_dir: Path,
) -> dict[str, Any]:
    from daemon.oneshot import watch_for_folder
    from daemon.queue import Database, DatabaseError, FileIndex, JobQueue
    from daemon.report.service import BusyError, ReportService, ScopeError
    from daemon.report.stats import Options

    settings = _settings(ctx)
    db_path = state_dir / "captiond.db"
    if not db_path.is_file():
        _fail(ctx, FileNotFoundError(f"no captiond database in {state_dir}"))
    folders = [Path(s) for s in scopes if Path(s).is_dir()]
    names = [s for s in scopes if not Path(s).is_dir()]
    if folders:  # a caption --once run: its folder is its root
        watches = [watch_for_folder(settings, f, None) for f in folders]
        settings = settings.model_copy(update={"watch": watches})
        names += [w.name for w in watches]
    try:
        db = Database(db_path)
    except DatabaseError as exc:
        _fail(ctx, exc)
    try:
        svc = ReportService(settings=settings, index=FileIndex(db), queue=JobQueue(db))
        svc.offline = True
        if refresh:
            click.echo(_refreshed(svc.refresh(names)), err=True)
        return svc.report(names, Options(**options))
    except (ScopeError, BusyError, ValueError) as exc:
        _fail(ctx, exc)
    finally:
        db.close()
    raise AssertionError("unreachable")


@main.group()
def flags() -> None:
    """Caption-check flags (listed by captiond report)."""


@flags.command("dismiss")
@click.argument("path")
@click.option("--generator", "-g", help="Only this generator's flags.")
@click.option("--check", help="Only this check's flag (gender, hair_colour, ...).")
@json_option
@click.pass_context
def flags_dismiss(
    ctx: click.Context, path: str, generator: str | None, check: str | None, as_json: bool
) -> None:
    """Dismiss an image's flags (ROOT/sub/file.png or a file path); they stay dismissed
    until the image changes."""
    p = Path(path)
    if p.is_file():
        from daemon.client import ClientError, api_path

        try:
            roots = _client(ctx).call("GET", "/api/roots").get("roots", [])
            path = api_path(roots, p)
        except ClientError as exc:
            _fail(ctx, exc)
    body = {"path": path, "generator": generator, "check": check}
    data = api_call("POST", "/api/flags/dismiss", body)(ctx)
    _out(data, as_json, lambda d: f"{d.get('count', 0)} flags dismissed ({d.get('path')})")


def format_status(s: dict[str, Any]) -> str:
    out = [
        f"captiond {s.get('version')}  pid {s.get('pid')}  up {_dur(s.get('uptime_seconds', 0))}",
        f"config: {s.get('config')}",
    ]
    worker = s.get("worker", {})
    if worker.get("paused"):
        out.append("PAUSED: no job is claimed (captiond resume)")
    for root in worker.get("paused_roots", []):
        name = next((n for n, w in s.get("watchers", {}).items() if w.get("path") == root), root)
        out.append(f"PAUSED: folder {name} (captiond resume {name})")
    for scope, c in s.get("conditions", {}).items():
        what = "all intake" if scope == "state" else f"folder {scope}"
        out.append(
            f"PAUSED {what}: {c['message']} since {c['since_text']}; probing (next in "
            f"{_dur(c['next_probe_in_seconds'])}), resumes by itself"
        )
    if backlog := s.get("intake_backlog"):
        out.append(f"  {backlog} new files kept in memory until the database takes writes")
    q = s.get("queue", {})
    totals = q.get("totals", {})
    out.append(
        "queue: "
        + ", ".join(f"{totals.get(k, 0)} {k}" for k in ("pending", "leased", "done", "failed"))
        + f", {totals.get('dead', 0)} dead"
    )
    if q.get("oldest_pending_seconds") is not None:
        out.append(f"  oldest pending: {_dur(q['oldest_pending_seconds'])}")
    if n := q.get("failed_by_conditions"):
        out.append(
            f"  {n} failed because of a full disk or a vanished share: a rescan retries them"
        )
    left = {"caption_exists": 0, "caption_edited": 0}
    for gen, outcomes in q.get("outcomes", {}).items():
        if outcomes:
            out.append(f"  {gen}: " + ", ".join(f"{n} {k}" for k, n in outcomes.items()))
            for k in left:
                left[k] += outcomes.get(k, 0)
    if left["caption_exists"]:
        out.append(
            f"  {left['caption_exists']} left alone: a caption captiond did not write was "
            "there first (existing_caption = skip)"
        )
    if left["caption_edited"]:
        out.append(
            f"  {left['caption_edited']} left alone: edited by a person after captiond wrote it"
        )
    out.append(f"files indexed: {s.get('files_indexed', 0)}")
    if flags := s.get("flags"):
        checks = ", ".join(f"{k} {n}" for k, n in flags.get("by_check", {}).items())
        out.append(
            f"caption flags: {flags.get('open', 0)} open"
            + (f" ({checks})" if checks else "")
            + f", {flags.get('dismissed', 0)} dismissed"
            + ("  (captiond report lists them)" if flags.get("open") else "")
        )
    out.append("generators:")
    for name, g in s.get("generators", {}).items():
        line = f"  {name:<14} {g.get('state')}"
        if g.get("reason"):
            line += f"  ({g['reason']})"
        if err := g.get("last_error"):
            line += f"  last error: {err['error_type']}: {err['message']}"
        if g.get("next_retry_in_seconds") is not None:
            line += f"  retry in {_dur(g['next_retry_in_seconds'])}"
        out.append(line)
    out.append("watchers:")
    for root, w in s.get("watchers", {}).items():
        alive = {None: "no observer", True: "alive"}.get(w.get("alive"), "NOT ALIVE")
        line = f"  {root:<14} {w.get('mode')} ({alive})"
        if w.get("reason"):
            line += f"  {w['reason']}"
        out.append(line)
    for root, last in s.get("scans", {}).get("last", {}).items():
        if last.get("ok"):
            out.append(
                f"  last scan {root}: {last.get('files_seen', 0)} files, {last.get('new', 0)} new, "
                f"{last.get('changed', 0)} changed in {last.get('seconds', 0):.2f}s"
            )
        else:
            out.append(f"  last scan {root}: FAILED: {last.get('error')}")
    clashes = s.get("worker", {}).get("stem_clashes", [])
    if clashes:
        out.append(f"stem clashes ({len(clashes)}):")
        out += [f"  {c['image']} -> {c['sidecar']}" for c in clashes[-10:]]
    errors = s.get("recent_errors", [])
    if errors:
        out.append("recent errors:")
        out += [
            f"  [{e['state']}] {e['error_type']}: {e['path']}: {e['error']}" for e in errors[:10]
        ]
    if overrides := s.get("overrides"):
        out.append("overridden through the API (captiond config reset drops them):")
        out += [f"  {section}: {', '.join(keys)}" for section, keys in overrides.items()]
    for i, b in enumerate(s.get("backfills", {}).get("runs", [])):
        if i == 0 or b.get("state") in ("running", "unresponsive"):  # and the latest
            out.append(_backfill_line(b))
    for w in s.get("warnings", []):
        out.append(f"warning: {w}")
    return "\n".join(out)


def _backfill_line(b: dict[str, Any]) -> str:
    line = (
        f"backfill {b.get('state')} ({b.get('host')}, pid {b.get('pid')}): {b.get('done', 0)}"
        f"/{b.get('total', 0)} {b.get('generator')}, {b.get('images_per_second', 0)} img/s, "
        f"{b.get('leased', 0)} leased, {len(b.get('actors') or [])} actors"
    )
    return line + (f"  {b['message']}" if b.get("message") else "")


def _dur(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def entry(argv: list[str] | None = None) -> None:
    """The console script: ``--config FILE`` is accepted after the subcommand too."""
    main(args=hoist_config(sys.argv[1:] if argv is None else argv), prog_name="captiond")


def hoist_config(args: list[str]) -> list[str]:
    """Move ``--config FILE`` / ``-c FILE`` / ``--config=FILE`` to the front, where
    click's group option reads it (everything after a lone ``--`` stays)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        if a in ("--config", "-c") and i + 1 < len(args):
            front += [a, args[i + 1]]
            i += 2
            continue
        if a.startswith("--config="):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


if __name__ == "__main__":  # pragma: no cover
    entry()
