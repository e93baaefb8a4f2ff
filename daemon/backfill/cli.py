"""``captiond backfill``: options in, a run with a progress line, an exit status out."""

from __future__ import annotations

import json
import sys

import click

from daemon.backfill.driver import Backfill, BackfillError, BackfillOptions, ray_executor
from daemon.backfill.progress import ProgressPrinter, summary
from daemon.backfill.spec import parse_path_map
from daemon.config import Settings
from daemon.queue import DatabaseError


def run_backfill(
    settings: Settings,
    roots: tuple[str, ...],
    *,
    ray_address: str,
    actors: int | None,
    gpus_per_actor: float | None,
    cpus_per_actor: float,
    generator: str | None,
    batch_size: int | None,
    limit: int | None,
    chunk_size: int,
    path_maps: tuple[str, ...],
    time_limit: float,
    stall_timeout: float,
    as_json: bool,
) -> int:
    """0 when every job taken was recorded without a failure, 1 when some failed or the
    run stopped early, 2 when it could not start."""
    from daemon.logs import configure_logging

    configure_logging("warning", settings.log_format)
    try:
        options = BackfillOptions(
            roots=list(roots),
            generator=generator,
            ray=ray_address,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            cpus_per_actor=cpus_per_actor,
            batch_size=batch_size,
            limit=limit,
            chunk_size=chunk_size,
            path_maps=[parse_path_map(m) for m in path_maps],
            time_limit=time_limit,
            stall_seconds=stall_timeout,
        )
        bf = Backfill(settings, options)
    except (BackfillError, DatabaseError, ValueError) as exc:
        click.echo(f"captiond: {exc}", err=True)
        return 2
    printer = ProgressPrinter()
    try:
        progress = bf.run(lambda p: printer(p.to_json()), make_executor=ray_executor(options))
    finally:
        printer.end()
        from daemon.backfill import cluster

        cluster.shutdown()
    info = progress.to_json()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(summary(info), file=sys.stdout)
    if progress.state != "finished":
        return 1 if progress.done or progress.state == "stopped" else 2
    return 1 if progress.failures else 0
