"""The ``captiond`` command line."""

from __future__ import annotations

import dataclasses
import json
import sys
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
        return load_settings(ctx.obj["config"], extra_watches=extra_watches)
    except ConfigError as exc:
        click.echo(f"captiond: invalid configuration\n{exc}", err=True)
        ctx.exit(2)


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
    settings = _settings(ctx)
    click.echo(f"# {settings.source}: OK")
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2))


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
@click.option("--force", is_flag=True, help="Replace existing captions (a person's too).")
@click.option("--no-post-process", is_flag=True, help="Write the generator's raw output.")
@click.option(
    "--once",
    is_flag=True,
    help="No daemon: run the pipeline in this process over one folder, then exit.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --once: keep the run's database here (default: a temporary one).",
)
@json_option
@click.pass_context
def caption(
    ctx: click.Context,
    paths: tuple[Path, ...],
    generator: str | None,
    force: bool,
    no_post_process: bool,
    once: bool,
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Caption images or folders now, at the highest priority, with a progress bar.

    Without --once the running daemon does the work (PATHS must be in watched folders);
    with --once this process does it for one folder and exits (1 if any image failed).
    """
    if once:
        _caption_once(ctx, paths, generator, force, no_post_process, state_dir, as_json)
    else:
        _caption_daemon(ctx, paths, generator, force, no_post_process, as_json)


def _caption_daemon(
    ctx: click.Context,
    paths: tuple[Path, ...],
    generator: str | None,
    force: bool,
    no_post_process: bool,
    as_json: bool,
) -> None:
    from daemon.client import ClientError, api_path
    from daemon.scanning.rules import is_candidate

    settings = _settings(ctx)
    client = _client(ctx)
    items: list[str] = []
    try:
        for p in paths:
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            for f in files:
                watch = settings.watch_for(str(f.absolute()))
                if p.is_dir() and (watch is None or not is_candidate(watch, f)):
                    continue
                items.append(api_path(settings, f))
        if not items:
            _fail(ctx, ClientError("no images to caption"))
        body = {
            "items": items,
            "generator": generator,
            "config": {"force": force, "post_process": not no_post_process},
        }
        results: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        with click.progressbar(
            length=len(items), label="captioning", file=sys.stderr, show_pos=True
        ) as bar:
            for event in client.stream("/api/batch-generate-captions", body):
                if event.get("type") == "item_complete":
                    results.append(event["item_result"])
                    bar.update(1)
                elif event.get("type") == "complete":
                    summary = event
        if not summary or len(results) != len(items):
            raise ClientError(
                f"the daemon stopped answering after {len(results)} of {len(items)} images"
            )
    except ClientError as exc:
        _fail(ctx, exc)
    failed = [r for r in results if not r.get("success") and not r.get("skipped")]
    if as_json:
        click.echo(json.dumps({"summary": summary, "results": results}, indent=2))
    else:
        click.echo(
            f"{summary.get('successful', 0)} captioned, {summary.get('skipped', 0)} skipped, "
            f"{summary.get('failed', 0)} failed"
        )
        for r in failed:
            click.echo(f"  {r.get('path')}: {r.get('error_type')}: {r.get('error')}")
    ctx.exit(1 if failed else 0)


def _caption_once(
    ctx: click.Context,
    paths: tuple[Path, ...],
    generator: str | None,
    force: bool,
    no_post_process: bool,
    state_dir: Path | None,
    as_json: bool,
) -> None:
    from daemon.logs import configure_logging
    from daemon.oneshot import run_once

    if len(paths) != 1 or not paths[0].is_dir():
        click.echo("captiond: --once takes one folder", err=True)
        ctx.exit(2)
    if no_post_process:
        click.echo("captiond: --no-post-process needs the daemon (omit --once)", err=True)
        ctx.exit(2)
    settings = _settings(ctx)
    configure_logging("warning", settings.log_format)
    with click.progressbar(length=1, label="captioning", file=sys.stderr, show_pos=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        try:
            result = run_once(
                settings,
                paths[0],
                generator=generator,
                force=force,
                state_dir=state_dir,
                progress=progress,
            )
        except ValueError as exc:
            click.echo(f"captiond: {exc}", err=True)
            ctx.exit(2)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        outs = ", ".join(f"{n} {k}" for k, n in sorted(result.outcomes.items())) or "nothing"
        click.echo(
            f"{result.total} images in {result.seconds:.1f}s: {outs}, {result.failed} failed"
        )
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
    configs = {g["name"]: g.get("config") for g in data.get("generators", [])}
    if generator is not None:
        if generator not in configs:
            _fail(ctx, ValueError(f"unknown generator {generator!r}"))
        configs = {generator: configs[generator]}
    if as_json:
        click.echo(json.dumps(configs, indent=2))
        return
    for name, cfg in configs.items():
        click.echo(f"[generators.{name}]")
        for key, value in (cfg or {}).items():
            click.echo(f"{key} = {json.dumps(value)}")
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


@main.command()
@click.option("--add", "add", multiple=True, help="Recognise another sidecar extension.")
@click.option("--remove", "remove", multiple=True, help="Forget a user-added extension.")
@json_option
@click.pass_context
def types(ctx: click.Context, add: tuple[str, ...], remove: tuple[str, ...], as_json: bool) -> None:
    """List the recognised sidecar extensions; --add/--remove change them (persisted)."""
    data = api_call("GET", "/api/caption-types")(ctx)
    if add or remove:
        user = [t for t in data.get("user", []) if t not in remove] + list(add)
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


def format_status(s: dict[str, Any]) -> str:
    out = [
        f"captiond {s.get('version')}  pid {s.get('pid')}  up {_dur(s.get('uptime_seconds', 0))}",
        f"config: {s.get('config')}",
    ]
    q = s.get("queue", {})
    totals = q.get("totals", {})
    out.append(
        "queue: "
        + ", ".join(f"{totals.get(k, 0)} {k}" for k in ("pending", "leased", "done", "failed"))
        + f", {totals.get('dead', 0)} dead"
    )
    if q.get("oldest_pending_seconds") is not None:
        out.append(f"  oldest pending: {_dur(q['oldest_pending_seconds'])}")
    for gen, outcomes in q.get("outcomes", {}).items():
        if outcomes:
            out.append(f"  {gen}: " + ", ".join(f"{n} {k}" for k, n in outcomes.items()))
    out.append(f"files indexed: {s.get('files_indexed', 0)}")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
