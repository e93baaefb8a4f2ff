"""Generator discovery: built-ins plus the ``captiond.generators`` entry-point group.

Importing a generator module must be cheap: heavy libraries are imported in load().
A generator whose module fails to import is reported, not fatal.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from daemon.generators.base import Availability, Generator

BUILTINS: dict[str, str] = {
    "wd_tagger": "daemon.generators.wd_tagger:WDTagger",
    "vlm": "daemon.generators.vlm:VLMGenerator",
    "multi_person": "daemon.generators.multi_person:MultiPersonGenerator",
    "remote_vlm": "daemon.generators.remote_vlm:RemoteVLMGenerator",
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


USE_KEY = "use"


def with_instances(
    found: dict[str, Discovered], tables: Mapping[str, Mapping[str, Any]]
) -> dict[str, Discovered]:
    """Add named instances: ``[generators.people_a] use = "multi_person"`` is another
    multi_person with its own settings, to list in a watch's ``generators``."""
    out = dict(found)
    for name, table in tables.items():
        base = table.get(USE_KEY)
        if base is None or name in found:
            continue
        if not isinstance(base, str) or base not in found:
            out[name] = Discovered(name, None, f"use = {base!r} names no generator")
        else:
            out[name] = Discovered(name, found[base].cls, found[base].error)
    return out


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
