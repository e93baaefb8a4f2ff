"""The control API on the daemon's socket: routes, schemas, path and peer security,
explicit caption requests, persisted runtime settings, OpenAPI."""

from daemon.api.routes import register_api

__all__ = ["register_api"]
