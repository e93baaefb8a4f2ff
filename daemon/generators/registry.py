"""Generator discovery: built-ins plus the ``captiond.generators`` entry-point group.

Importing a generator module must be cheap: heavy libraries are imported in load().
A generator whose module fails to import is reported, not fatal.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from daemon.generators.base import Availability, Generator

BUILTINS: dict[str, str] = {
    "wd_tagger": "daemon.generators.wd_tagger:WDTagger",
    "vlm": "daemon.generators.vlm:VLMGenerator",
    "multi_person": "daemon.generators.multi_person:MultiPersonGenerator",
}

ENTRY_POINT_GROUP = "captiond.generators"


@dataclass(frozen=True, slots=True)
class Discovered:
    name: str
    cls: type[Generator] | None
    error: str = ""

    def availability(self) -> Availability:
        if self.cls is None:
            return Availability(False, self.error)
        try:
            return self.cls.is_available()
        except Exception as exc:  # is_available must not raise; be safe anyway
            return Availability(False, f"is_available() raised {type(exc).__name__}: {exc}")


def _load_ref(ref: str) -> type[Generator]:
    module_name, _, attr = ref.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise TypeError(f"{ref} is not a Generator subclass")
    return cls


def discover() -> dict[str, Discovered]:
    """All known generators by name; import failures are kept with their reason."""
    refs = dict(BUILTINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        refs.setdefault(ep.name, ep.value)
    found: dict[str, Discovered] = {}
    for name, ref in refs.items():
        try:
            found[name] = Discovered(name, _load_ref(ref))
        except Exception as exc:
            reason = f"cannot import {ref}: {type(exc).__name__}: {exc}"
            found[name] = Discovered(name, None, reason)
    return found
