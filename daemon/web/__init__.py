"""The web UI: pages to watch captiond work and to review and fix captions, served by
the daemon itself under ``/ui/`` on its own listeners (routes over the control facade,
like the API's). See :mod:`daemon.web.routes`."""

from daemon.web.routes import WebUI, register_web

__all__ = ["WebUI", "register_web"]
