"""The report as text for a terminal (``captiond report`` without ``--json``)."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(r: dict[str, Any], *, rows: int = 15) -> str:
    cov, tags, length = r.get("coverage", {}), r.get("tags", {}), r.get("length", {})
    images, flags, texts = r.get("images", {}), r.get("flags", {}), r.get("texts", {})
    scope = ", ".join(s["root"] + (f"/{s['folder']}" if s.get("folder") else "")
                      for s in r.get("scope", []))  # fmt: skip
    out = [f"dataset report: {scope}"]
    n = cov.get("images", 0)
    person = cov.get("by_person", {})
    out.append(
        f"images: {n}  captioned: {cov.get('captioned', 0)}  by a person: "
        f"{person.get('images', 0)}  pending: {cov.get('pending', 0)}  no caption: "
        f"{cov.get('no_caption', 0)}"
    )
    for gen, g in cov.get("by_generator", {}).items():
        types = ", ".join(f".{t} {c}" for t, c in g["sidecar_types"].items())
        out.append(f"  {gen}: {g['images']} ({types})")
    for state, by_type in cov.get("failed", {}).items():
        if by_type:
            out.append(f"  {state}: " + ", ".join(f"{t} {c}" for t, c in by_type.items()))
    if texts.get("unknown") or texts.get("read_back_after_edit"):
        out.append(
            f"  caption texts unknown (older records): {texts.get('unknown', 0)}; read back "
            f"after a person's edit: {texts.get('read_back_after_edit', 0)}"
        )
    out.append(
        f"tags: {tags.get('tagged_images', 0)} tagged images, {tags.get('distinct', 0)} distinct"
    )
    top = tags.get("top", [])[:rows]
    if top:
        out.append("  " + ", ".join(f"{t['tag']} {_pct(t['share'])}" for t in top))
    if every := tags.get("in_every_image"):
        out.append(f"  in every image (they teach nothing): {', '.join(every)}")
    rare = tags.get("rare", {})
    if rare.get("count"):
        out.append(f"  rare (seen once or twice): {rare['count']}")
    for t in tags.get("trigger", []):
        out.append(
            f"  trigger '{t['word']}' ({t['root']}): {t['with_trigger']} of "
            f"{t['captioned_images']} images ({_pct(t['share'])})"
            + (f"; missing in e.g. {', '.join(t['missing'][:3])}" if t["missing"] else "")
        )
        if t["co_occurring"]:
            out.append(
                "    with it: " + ", ".join(f"{c['tag']} {_pct(c['share'])}"
                                            for c in t["co_occurring"][:8])
            )  # fmt: skip
    clip = length.get("clip", {})
    out.append(f"length ({clip.get('note', '')}):")
    for gen, g in length.get("by_generator", {}).items():
        w = g["words"]
        out.append(
            f"  {gen}: words median {w['median']}, max {w['max']}; over {clip.get('limit')} "
            f"CLIP tokens: {g['over_clip_limit']} ({_pct(g['over_clip_share'])})"
        )
    below = images.get("below_resolution", {})
    b = images.get("buckets", {})
    out.append(
        f"images: size known for {images.get('with_size', 0)}; below "
        f"{below.get('resolution')}²: {below.get('count', 0)}; upscaled into their bucket: "
        f"{b.get('upscaled', 0)}"
    )
    if b.get("list"):
        busiest = sorted(b["list"], key=lambda x: -x["count"])[:8]
        out.append("  buckets: " + ", ".join(f"{x['bucket']} {x['count']}" for x in busiest))
    dups, near = images.get("exact_duplicates", {}), images.get("near_duplicates", {})
    out.append(
        f"  exact duplicates: {dups.get('groups', 0)} groups ({dups.get('redundant', 0)} "
        f"extra copies); near duplicates: {near.get('groups') or 0} groups "
        f"({near.get('hashed', 0)} of {near.get('contents', 0)} contents hashed)"
    )
    for g in dups.get("list", [])[:5]:
        out.append("    = " + ", ".join(g["paths"][:4]) + (" ..." if g["count"] > 4 else ""))
    for g in near.get("list", [])[:5]:
        out.append(f"    ~ ({g['max_distance']} bits) " + ", ".join(g["paths"][:4]))
    by_check = ", ".join(f"{k} {v['open']}" for k, v in flags.get("by_check", {}).items()
                         if v["open"])  # fmt: skip
    out.append(
        f"flags: {flags.get('open', 0)} open" + (f" ({by_check})" if by_check else "")
        + f", {flags.get('dismissed', 0)} dismissed"
        + (f"; {flags['not_checked_yet']} images not checked yet"
           if flags.get("not_checked_yet") else "")
    )  # fmt: skip
    for f in flags.get("list", [])[:rows]:
        out.append(f"  {f['path']} [{f['generator']} {f['check']}]: {f['reason']}")
    if flags.get("open", 0) > rows:
        out.append(f"  ... {flags['open'] - rows} more (--json or --html for all)")
    return "\n".join(out)
