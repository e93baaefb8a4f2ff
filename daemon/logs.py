"""structlog setup: JSON lines for journald when stderr is not a terminal,
readable console output when it is."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    use_console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    # Tracebacks never show local variables: they may hold a request body (a person's
    # caption), a token or an API key.
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(
            colors=True, exception_formatter=structlog.dev.plain_traceback
        )
    else:
        shared += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
        renderer = structlog.processors.JSONRenderer()
    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Not cached: a later configure (a command run in-process after another, as
        # the tests do) applies to every module's logger, not only to new ones.
        cache_logger_on_first_use=False,
    )
    # Libraries (watchdog, huggingface_hub, ...) log through stdlib logging: render their
    # records with the same renderer, so journald gets one JSON line per record.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    _quiet_huggingface_handler()


def _quiet_huggingface_handler() -> None:
    """huggingface_hub adds its own stderr handler; let its records reach ours only."""
    try:
        from huggingface_hub.utils import logging as hf_logging
    except ImportError:
        return
    hf_root = hf_logging.get_logger()
    hf_root.handlers.clear()
    hf_root.propagate = True
