"""The ``captiond`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from daemon import __version__
from daemon.config import ConfigError, Settings, load_settings


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
    from daemon.app import Daemon
    from daemon.queue.db import DatabaseError
    from daemon.server import SocketPathError

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
    settings = _settings(ctx)
    from daemon.server import DaemonNotRunning, request

    tried = settings.client_socket_paths()
    for sock in tried:
        try:
            code, body = request(sock, "GET", "/status")
            break
        except DaemonNotRunning:
            continue
        except OSError as exc:  # permission denied, timed out
            click.echo(f"captiond: {sock}: {exc}", err=True)
            ctx.exit(1)
    else:
        where = ", ".join(str(p) for p in tried)
        click.echo(f"captiond is not running (no answer on {where})", err=True)
        ctx.exit(1)
    if code != 200:
        click.echo(f"captiond answered {code}: {body.get('error', body)}", err=True)
        ctx.exit(1)
    click.echo(json.dumps(body, indent=2) if as_json else format_status(body))


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
    for w in s.get("warnings", []):
        out.append(f"warning: {w}")
    return "\n".join(out)


def _dur(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
