"""The report as one standalone HTML file: tables, and plots drawn by matplotlib as
inline SVG (no script, no network, nothing beside the file).

Everything taken from the report (paths, tags, reasons) is escaped; plot labels are
drawn as text with mathtext off (a tag like ``$_$`` is a kaomoji, not a formula).
Without matplotlib (the ``report`` extra) the page has the tables and says why the
plots are missing.
"""

from __future__ import annotations

import datetime as dt
import html
import io
from collections.abc import Sequence
from typing import Any

PLOT_COLOUR = "#3b6ea8"
FLAG_COLOUR = "#b5523b"


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    horizontal: bool = False,
    colour: str = PLOT_COLOUR,
    xlabel: str = "",
) -> str:
    """An SVG bar chart (matplotlib), as a string to inline in HTML."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    n = max(len(labels), 1)
    size = (7.5, max(2.2, 0.26 * n + 0.9)) if horizontal else (7.5, 3.2)
    with rc_context({"text.parse_math": False, "svg.fonttype": "path", "svg.hashsalt": "cd",
                     "font.size": 9}):  # fmt: skip
        fig = Figure(figsize=size, layout="constrained")
        ax = fig.add_subplot()
        pos = list(range(len(labels)))
        if horizontal:
            ax.barh(pos, values, color=colour)
            ax.set_yticks(pos, [str(x) for x in labels])
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
        else:
            ax.bar(pos, values, color=colour)
            ax.set_xticks(pos, [str(x) for x in labels], rotation=30 if n > 6 else 0,
                          ha="right" if n > 6 else "center")  # fmt: skip
            ax.set_ylabel(xlabel)
        from matplotlib.ticker import MaxNLocator

        (ax.xaxis if horizontal else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="x" if horizontal else "y", alpha=0.3)
        ax.set_axisbelow(True)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # without the XML prolog: inline in HTML


def _trim(bins: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Histogram bins up to the last one that is not empty (at least one)."""
    last = max((i for i, b in enumerate(bins) if b.get("count")), default=0)
    return list(bins[: last + 1])


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "", empty: str = "none"
) -> str:
    if not rows:
        return f'<p class="none">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _card(label: str, value: Any, note: str = "", warn: bool = False) -> str:
    return (
        f'<div class="card{" warn" if warn else ""}"><div class="v">{_e(value)}</div>'
        f'<div class="l">{_e(label)}</div><div class="n">{_e(note)}</div></div>'
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;
background:#f4f5f7}
header{background:#1d2433;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#c5cbd6}
main{max-width:1100px;margin:0 auto;padding:20px 32px 48px}
section{background:#fff;border-radius:8px;padding:16px 20px;margin:18px 0;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:18px;margin:0 0 10px} h3{font-size:15px;margin:16px 0 6px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .v{font-size:24px;font-weight:600}.card .l{color:#4b5566}
.card .n{color:#7a8394;font-size:12px}
.card.warn .v{color:#b5523b}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e6e8ec;vertical-align:top;
word-break:break-word} th{background:#f0f2f5;font-weight:600}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.plot svg{max-width:100%;height:auto} .note{color:#6b7383;font-size:12.5px}
.none{color:#8a93a3;font-style:italic} code{background:#f0f2f5;padding:1px 4px;border-radius:3px}
@media(max-width:800px){.grid2{grid-template-columns:1fr}}
"""


def render(report: dict[str, Any], *, title: str = "captiond dataset report") -> str:
    """The whole page for a report from :func:`daemon.report.stats.build_report`."""
    plots = _plots_available()

    def plot(*args: Any, **kw: Any) -> str:
        if not plots:
            return ""
        return f'<div class="plot">{bar_chart(*args, **kw)}</div>'

    cov = report.get("coverage", {})
    tags = report.get("tags", {})
    length = report.get("length", {})
    images = report.get("images", {})
    flags = report.get("flags", {})
    texts = report.get("texts", {})
    when = dt.datetime.fromtimestamp(report.get("generated_at", 0)).strftime("%Y-%m-%d %H:%M")
    scope = ", ".join(
        s["root"] + (f"/{s['folder']}" if s.get("folder") else "") for s in report.get("scope", [])
    )
    parts: list[str] = []
    over = sum(g.get("over_clip_limit", 0) for g in length.get("by_generator", {}).values())
    dups = images.get("exact_duplicates", {})
    near = images.get("near_duplicates", {})
    failed = sum(n for states in cov.get("failed", {}).values() for n in states.values())
    parts.append('<div class="cards">' + "".join([
        _card("images", cov.get("images", 0)),
        _card("captioned", cov.get("captioned", 0),
              _pct(cov.get("captioned", 0) / cov["images"]) if cov.get("images") else ""),
        _card("no caption", cov.get("no_caption", 0), warn=bool(cov.get("no_caption"))),
        _card("failed or dead", failed, warn=bool(failed)),
        _card("flags to review", flags.get("open", 0), warn=bool(flags.get("open"))),
        _card("over the CLIP limit", over, "captions", warn=bool(over)),
        _card("exact duplicates", dups.get("redundant", 0), "extra copies"),
        _card("near-duplicate groups", near.get("groups") or 0),
    ]) + "</div>")  # fmt: skip
    if not plots:
        parts.append(
            '<p class="note">Plots need matplotlib: <code>pip install "captiond[report]"</code>.'
            "</p>"
        )

    # coverage
    by_gen = cov.get("by_generator", {})
    person = cov.get("by_person", {})
    rows = [[g, v["images"], ", ".join(f".{t} {n}" for t, n in v["sidecar_types"].items())]
            for g, v in by_gen.items()]  # fmt: skip
    fail_rows = [
        [state, et, n] for state, d in cov.get("failed", {}).items() for et, n in d.items()
    ]
    cov_plot = plot(
        ["captioned", "by a person", "pending", "failed/dead", "no caption"],
        [cov.get("captioned", 0), person.get("images", 0), cov.get("pending", 0), failed,
         cov.get("no_caption", 0)],
        title="Coverage (images)",
    )  # fmt: skip
    parts.append(
        '<section id="coverage"><h2>Coverage</h2><div class="grid2"><div>'
        + _table(["generator", "images", "sidecars"], rows)
        + _table(
            ["by a person", "images"],
            [
                ["written through the API", person.get("written_through_api", 0)],
                ["kept as found", person.get("kept_as_found", 0)],
                ["edited after captiond wrote it", person.get("edited_after_captiond", 0)],
            ],
        )
        + "<h3>Failed and dead, by error type</h3>"
        + _table(["state", "error type", "jobs"], fail_rows)
        + f'<p class="note">Empty after post-processing (the job failed): '
        f"{_e(cov.get('empty_after_post_processing', 0))}.<br>Caption texts: "
        f"{_e(texts.get('known', 0))} known, {_e(texts.get('unknown', 0))} unknown (written "
        "before captiond kept texts), "
        f"{_e(texts.get('read_back_after_edit', 0))} read back after a person's edit. A "
        "caption edited on disk counts with captiond's text until <code>captiond report "
        "--refresh</code> reads the files back.</p>"
        + f"</div><div>{cov_plot}</div></div></section>"
    )

    # tags
    top = tags.get("top", [])
    t_rows = [[t["tag"], t["count"], _pct(t["share"])] for t in top]
    trig_html = ""
    for t in tags.get("trigger", []):
        gens = ", ".join(
            f"{g}: {v['with_trigger']}/{v['captions']}" for g, v in t["by_generator"].items()
        )
        trig_html += (
            f"<h3>Trigger word <code>{_e(t['word'])}</code> in {_e(t['root'])}</h3>"
            f"<p>In {_e(t['with_trigger'])} of {_e(t['captioned_images'])} captioned images "
            f"({_pct(t['share'])}); {_e(gens)}.</p>"
            + (f'<p class="note">Without it: {_e(", ".join(t["missing"]))}</p>'
               if t["missing"] else "")
            + "<p>Tags that co-occur most with it:</p>"
            + _table(["tag", "images", "share"],
                     [[c["tag"], c["count"], _pct(c["share"])] for c in t["co_occurring"]])
        )  # fmt: skip
    folder_rows = [
        [f["folder"], f["images"], f["distinct"],
         ", ".join(f"{x['tag']} ({_pct(x['share'])})" for x in f["top"][:6])]
        for f in tags.get("per_folder", {}).get("list", [])
    ]  # fmt: skip
    rare = tags.get("rare", {})
    every = tags.get("in_every_image", [])
    rare_text = ", ".join(f"{r['tag']} ({r['count']})" for r in rare.get("list", []))
    made_by = ", ".join(tags.get("generators", [])) or "no tagger"
    parts.append(
        '<section id="tags"><h2>Tags</h2>'
        f'<p class="note">{_e(tags.get("tagged_images", 0))} tagged images, '
        f"{_e(tags.get('distinct', 0))} distinct tags (from {_e(made_by)}).</p>"
        + plot([t["tag"] for t in top[:25]], [t["count"] for t in top[:25]],
               title="Most frequent tags", horizontal=True, xlabel="images")
        + '<div class="grid2"><div><h3>Frequency</h3>'
        + _table(["tag", "images", "share"], t_rows)
        + "</div><div>" + (trig_html or "<h3>Trigger word</h3><p class='none'>none set</p>")
        + "<h3>In every image (they teach nothing)</h3>"
        + (f"<p>{_e(', '.join(every))}</p>" if every else '<p class="none">none</p>')
        + f"<h3>Rare tags ({_e(rare.get('count', 0))} seen once or twice)</h3>"
        + f"<p>{_e(rare_text)}</p>"
        + "</div></div><h3>Per folder</h3>"
        + _table(["folder", "images", "distinct tags", "top tags"], folder_rows)
        + "</section>"
    )  # fmt: skip

    # length
    clip = length.get("clip", {})
    len_html = ""
    for gen, g in length.get("by_generator", {}).items():
        w = g["words"]
        len_html += (
            f"<h3>{_e(gen)}</h3><p>{_e(w['count'])} captions; words: min {_e(w['min'])}, "
            f"median {_e(w['median'])}, mean {_e(w['mean'])}, max {_e(w['max'])}. "
            f"Over the CLIP limit: <b>{_e(g['over_clip_limit'])}</b> "
            f"({_pct(g['over_clip_share'])}).</p>"
            + plot([b["bin"] for b in _trim(g["histogram"])],
                   [b["count"] for b in _trim(g["histogram"])],
                   title=f"Words per caption: {gen}", xlabel="captions")
            + _table(["longest captions over the limit", "tokens", "words"],
                     [[x["path"], x["tokens"], x["words"]] for x in g["examples"]],
                     empty="no caption over the limit")
        )  # fmt: skip
    parts.append(
        '<section id="length"><h2>Length</h2>'
        f'<p class="note">CLIP reads {_e(clip.get("limit"))} tokens (start and end included): '
        f"{_e(clip.get('note'))}.</p>"
        + (len_html or '<p class="none">no caption texts</p>')
        + "</section>"
    )

    # images
    below = images.get("below_resolution", {})
    buckets = images.get("buckets", {})
    mp = _trim(images.get("megapixels", []))
    aspect = images.get("aspect", [])
    near_rows = [[g["contents"], g["max_distance"], ", ".join(g["paths"])]
                 for g in near.get("list", [])]  # fmt: skip
    near_note = (
        f"{near.get('hashed', 0)} of {near.get('contents', 0)} contents hashed "
        f"({near.get('not_hashed_yet', 0)} not yet, {near.get('unreadable', 0)} unreadable, "
        f"{near.get('too_plain', 0)} too plain to compare); "
        f"at most {near.get('distance')} bits apart. {near.get('error') or ''}"
    )
    parts.append(
        '<section id="images"><h2>Images</h2>'
        f'<p class="note">{_e(images.get("with_size", 0))} images with a known size, '
        f"{_e(images.get('without_size', 0))} without. {_e(images.get('size_note'))}.</p>"
        '<div class="grid2"><div>'
        + plot([b["bin"] for b in mp], [b["count"] for b in mp], title="Size (megapixels)",
               xlabel="images")
        + "</div><div>"
        + plot([b["bin"] for b in aspect], [b["count"] for b in aspect],
               title="Aspect ratio (width:height)", xlabel="images")
        + "</div></div>"
        + f"<h3>Below {_e(below.get('resolution'))}² pixels: {_e(below.get('count', 0))} "
        f"({_pct(below.get('share'))})</h3>"
        + _table(["image", "size"], [[x["path"], x["size"]] for x in below.get("examples", [])])
        + f"<h3>Buckets at {_e(buckets.get('resolution'))}, step {_e(buckets.get('step'))} "
        f"({_e(buckets.get('min'))}..{_e(buckets.get('max'))}); upscaled: "
        f"{_e(buckets.get('upscaled', 0))}</h3>"
        + plot([b["bucket"] for b in buckets.get("list", [])],
               [b["count"] for b in buckets.get("list", [])],
               title="Images per aspect-ratio bucket (as kohya's sd-scripts buckets)",
               xlabel="images")
        + f"<h3>Exact duplicates: {_e(dups.get('groups', 0))} groups, "
        f"{_e(dups.get('redundant', 0))} extra copies</h3>"
        + _table(["copies", "images"],
                 [[g["count"], ", ".join(g["paths"])] for g in dups.get("list", [])],
                 empty="no exact duplicates")
        + f"<h3>Near duplicates: {_e(near.get('groups') or 0)} groups</h3>"
        + f'<p class="note">{_e(near_note)}</p>'
        + _table(["contents", "max distance", "images"], near_rows, empty="no near duplicates")
        + "</section>"
    )  # fmt: skip

    # flags
    by_check = flags.get("by_check", {})
    parts.append(
        '<section id="flags"><h2>Caption flags for review</h2>'
        f"<p>{_e(flags.get('open', 0))} open, {_e(flags.get('dismissed', 0))} dismissed"
        + (f"; {_e(flags.get('not_checked_yet'))} images not checked yet"
           if flags.get("not_checked_yet") else "") + ".</p>"
        + plot(list(by_check), [v["open"] for v in by_check.values()],
               title="Open flags by check", horizontal=True, colour=FLAG_COLOUR,
               xlabel="images")
        + _table(["image", "generator", "check", "reason"],
                 [[f["path"], f["generator"], f["check"], f["reason"]]
                  for f in flags.get("list", [])], cls="flags", empty="nothing to review")
        + "</section>"
    )  # fmt: skip
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(scope)} &middot; {_e(when)}</p></header>"
        f"<main>{''.join(parts)}</main></body></html>"
    )
