"""Where an image's caption goes, and what of that file is captiond's.

:func:`sidecar_target` is the one place that decides a sidecar's name and ownership;
the pipeline, the API's caption writes and the Ray driver all call it.

Naming: ``<stem>.<ext>`` (what trainers read) or ``<name>.<ext>``. When two images
share a stem (``a.jpg``, ``a.png``) the one captiond already wrote ``a.<ext>`` for
keeps it; if none did, the first name in sort order takes it; every other one gets
``<name>.<ext>`` (``a.png.txt``), so neither can overwrite the other's caption. An
image keeps the sidecar it has, also after the clash ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from daemon.queue.index import CaptionRecord


@dataclass(frozen=True, slots=True)
class Target:
    """A sidecar: its name in the image's folder and what captiond knows of it."""

    name: str
    record: CaptionRecord | None  # captiond's record of this (image, generator), if any
    ours: frozenset[str] = field(default_factory=frozenset)  # hashes captiond may replace
    clash_with: str | None = None  # an image sharing the stem (the name form was chosen)


def stem_and_name_forms(image_name: str, ext: str) -> tuple[str, str]:
    """(stem form, name form): ``a.jpg`` -> (``a.txt``, ``a.jpg.txt``)."""
    stem = image_name.rsplit(".", 1)[0] if "." in image_name[1:] else image_name
    return f"{stem}.{ext}", f"{image_name}.{ext}"


def image_stem(image_name: str) -> str:
    return image_name.rsplit(".", 1)[0] if "." in image_name[1:] else image_name


def siblings_of(
    image_name: str, names: Iterable[str], image_extensions: Iterable[str]
) -> list[str]:
    """Other images in the same folder with the same stem (``a.png`` beside ``a.jpg``),
    from names the caller already has (the index, or a listing), in sort order."""
    stem = image_stem(image_name)
    exts = {e.lower() for e in image_extensions}
    out = []
    for n in names:
        if n == image_name or not n.startswith(stem + "."):
            continue
        if n[len(stem) + 1 :].lower() in exts:
            out.append(n)
    return sorted(out)


def sidecar_target(
    image_name: str,
    ext: str,
    *,
    naming: str,
    record: CaptionRecord | None,
    siblings: list[str],
    stem_owner: str | None,
    folder_path: str,
    legacy_ext: str | None = None,
) -> Target:
    """The sidecar of image ``image_name`` (in ``folder_path``) with extension ``ext``.

    ``record``: captiond's record of this image and generator. ``siblings``: other
    images with the same stem. ``stem_owner``: the image path captiond recorded as the
    writer of the stem-form sidecar, if any (only asked when there are siblings).
    ``legacy_ext``: an earlier default extension (captiond before 0.2 wrote ``.tags``
    where it now writes ``.txt`` by default): an image keeps a sidecar it got under it.
    """
    stem_form, name_form = stem_and_name_forms(image_name, ext)
    if stem_form == image_name or name_form == image_name:
        raise ValueError(f"sidecar extension .{ext} would name the image itself")
    base = folder_path.rstrip("/")
    image_path = f"{base}/{image_name}"

    def owned(name: str) -> Target:
        ours = record.owned_hashes(f"{base}/{name}") if record else frozenset()
        return Target(name, record, ours)

    kept = {f"{base}/{stem_form}", f"{base}/{name_form}"}
    if legacy_ext:
        kept |= {f"{base}/{n}" for n in stem_and_name_forms(image_name, legacy_ext)}
    if record is not None and record.sidecar_path in kept:
        return owned(record.sidecar_path.rsplit("/", 1)[1])  # an image keeps its sidecar
    if naming == "name":
        return owned(name_form)
    if not siblings:
        return owned(stem_form)
    if stem_owner is None and min([image_name, *siblings]) == image_name:
        return owned(stem_form)  # unowned: the first name in sort order takes it
    if stem_owner == image_path:
        return owned(stem_form)
    t = owned(name_form)
    return Target(t.name, t.record, t.ours, clash_with=siblings[0])
