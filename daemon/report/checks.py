"""Caption checks: contradictions between an image's tags and its prose captions, and
problems of prose on its own, flagged for a person to look at.

The rules are data (:mod:`daemon.report.rules`); this module reads captions the way
captiond writes them and applies the rules. Everything here is pure: captions in,
findings out. :func:`check_images` reads the captions from the index, checks them and
stores the flags (SQL in ``daemon/queue/index.py``); it reads nothing from the disk.

What is compared: a prose caption (a VLM's, or multi_person's ``sksA: ...`` lines) with
the union of the tags of the same image content (WD tags; multi_person's per-person
tags without their ``person1`` markers). Captions of an older content of the image (a
generator not yet done with a changed image) are not compared with newer ones.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.report import rules as R
from daemon.text.tags import KAOMOJI

MAX_CHECK_CHARS = 20_000  # a longer caption is checked on its first 20,000 characters


@dataclass(frozen=True, slots=True)
class Source:
    """How to read one generator's captions."""

    name: str
    kind: str = "tags"  # "tags" or "prose"
    people: str = ""  # "markers" (person1, ... in tags) or "lines" (sksA: ... lines)
    markers: tuple[str, ...] = ()  # custom person aliases
    marker_template: str = "person{n}"
    scene: str = ""  # the scene marker (tags) or line label (prose)
    prompts: tuple[str, ...] = ()  # prompts the describer was given (echo check)

    def fingerprint(self) -> str:
        return repr(
            (self.kind, self.people, self.markers, self.marker_template, self.scene, self.prompts)
        )


@dataclass(frozen=True, slots=True)
class Context:
    """What the checks of one image depend on besides its captions."""

    trigger: str = ""
    language: str = "en"


@dataclass(slots=True)
class Reading:
    """One caption as the rules see it."""

    generator: str
    kind: str
    content_hash: str
    text: str
    tags: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)  # prose, one entry per person line
    labels: list[str] = field(default_factory=list)  # the people lines' labels
    people: int | None = None  # people marked by multi_person (None: not a people caption)
    empty: bool = False
    trigger: bool = False  # the trigger word is in the caption

    @property
    def prose(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True, slots=True)
class Finding:
    generator: str
    check: str
    reason: str
    content_hash: str


# -- reading captions --------------------------------------------------------------------

_LINE = re.compile(r"^\s*([^:\n]{1,48}?)\s*:\s+(.*)$")
_GUESS_LINES = re.compile(
    r"^\s*(?:sks[A-Z]|unidentified (?:woman|man|person)|scene)\s*:", re.IGNORECASE | re.M
)
_GUESS_MARKER = re.compile(r"(?:^|,\s*)person\d+\s*(?:,|$)")


def _normal(tag: str) -> str:
    t = tag.strip().lower().replace("\\(", "(").replace("\\)", ")")
    return t if t in KAOMOJI else t.replace("_", " ")


class _TagCache(dict[str, str]):
    """raw tag -> normal tag, filled on first sight (tags repeat across a dataset)."""

    def __missing__(self, raw: str) -> str:
        if len(self) > 200_000:
            self.clear()
        out = self[raw] = _normal(raw)
        return out


TAGS = _TagCache()


def normal_tag(tag: str) -> str:
    """A tag as the rules write it: lower case, spaces (kaomoji keep underscores),
    prompt escapes undone."""
    return TAGS[tag]


def guess_source(name: str, text: str) -> Source:
    """A source for a generator that is not configured (any more): from its text."""
    if _GUESS_LINES.search(text):
        return Source(name, "prose", people="lines", scene="scene")
    if _GUESS_MARKER.search(text):
        return Source(name, "tags", people="markers", scene="scene")
    items = [i for i in re.split(r"[,\n]", text) if i.strip()]
    words = sum(len(i.split()) for i in items)
    sentence = re.search(r"[a-z]{2}[.!?](?:\s+\w|\s*$)", text.strip())
    if items and words / len(items) <= 3.0 and not sentence:
        return Source(name, "tags")  # tag lists never end a sentence with a period
    return Source(name, "prose")


@functools.lru_cache(maxsize=64)
def trigger_re(trigger: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE)


def _strip_trigger(text: str, trigger: str) -> tuple[str, bool]:
    """``text`` without the trigger word, and whether it was there."""
    if not trigger.strip():
        return text, False
    out, n = trigger_re(trigger.strip()).subn(" ", text)
    return out, n > 0


@functools.cache
def _marker_re(template: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in template.split("{n}")]
    return re.compile(r"\d+".join(parts) + "$", re.IGNORECASE)


def read_caption(source: Source, text: str, content_hash: str, ctx: Context) -> Reading:
    """A caption's tags, prose lines and people, by its source's format."""
    text = text[:MAX_CHECK_CHARS]
    r = Reading(source.name, source.kind, content_hash, text)
    trigger = ctx.trigger.strip().lower()
    if source.kind == "tags" and source.people != "markers":  # the common case, fast
        tags = set(map(TAGS.__getitem__, text.replace("\n", ",").split(",")))
        tags.discard("")
        want = normal_tag(trigger) if trigger else ""
        if want and want in tags:
            r.trigger = True
            tags.discard(want)
        r.tags = tags
        r.empty = not tags
        return r
    if source.kind == "tags":
        marker = _marker_re(source.marker_template)
        custom = {m.lower() for m in source.markers}
        people = 0
        want = normal_tag(trigger) if trigger else ""
        for raw in text.replace("\n", ",").split(","):
            tag = normal_tag(raw)
            if not tag:
                continue
            if tag == want:
                r.trigger = True
                continue
            if source.people == "markers":
                if tag in custom or marker.match(tag):
                    people += 1
                    continue
                if source.scene and tag == source.scene.lower():
                    continue
            r.tags.add(tag)
        if source.people == "markers":
            r.people = people
        r.empty = not r.tags and not people
        return r
    body, r.trigger = _strip_trigger(text, ctx.trigger)
    if source.people == "lines":
        scene = source.scene.lower()
        people = 0
        for line in body.splitlines():
            if not line.strip():
                continue
            m = _LINE.match(line)
            if m:
                label, rest = m.group(1).strip(), m.group(2)
                if label.lower() != scene:
                    people += 1
                    r.labels.append(label)
                r.lines.append(rest)
            else:
                r.lines.append(line)
        r.people = people
    else:
        r.lines = [line for line in body.splitlines() if line.strip()] or [body]
    r.empty = not any(re.search(r"\w", line) for line in r.lines)
    return r


# -- matching words ----------------------------------------------------------------------


@functools.cache
def _words_re(words: tuple[str, ...]) -> re.Pattern[str]:
    alts = sorted({w.lower() for w in words}, key=len, reverse=True)
    body = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in alts)
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])")


@functools.cache
def _depiction_re() -> re.Pattern[str]:
    dep = "|".join(sorted(R.DEPICTIONS, key=len, reverse=True))
    link = "|".join(R.DEPICTION_LINKS)
    return re.compile(
        rf"(?<![\w-])(?:{dep})s?\s+(?:{link})\s+(?:[\w'’-]+[\s,]+){{0,{R.DEPICTION_SPAN - 1}}}"
        r"[\w'’-]+"
    )


def _prose_for_rules(text: str) -> str:
    """Lower case, one kind of apostrophe, pictures of things masked out."""
    t = text.lower().replace("’", "'").replace("‘", "'")
    return _depiction_re().sub(" | ", t)


def _spans(text: str, groups: Sequence[tuple[str, ...]]) -> list[list[str]]:
    """The words of each group found in ``text``; overlapping finds go to the longest
    ("no people" is not also "people")."""
    found: list[tuple[int, int, int, str]] = []
    for gi, words in enumerate(groups):
        for m in _words_re(words).finditer(text):
            found.append((m.start(), m.end(), gi, m.group(0)))
    found.sort(key=lambda f: (-(f[1] - f[0]), f[0]))
    taken: list[tuple[int, int]] = []
    out: list[list[str]] = [[] for _ in groups]
    for start, end, gi, word in found:
        if any(start < e and s < end for s, e in taken):
            continue
        taken.append((start, end))
        out[gi].append(" ".join(word.split()))
    return out


def _quote(words: Iterable[str], limit: int = 3) -> str:
    uniq = list(dict.fromkeys(words))
    shown = ", ".join(f"'{w}'" for w in uniq[:limit])
    return shown + (", ..." if len(uniq) > limit else "")


# -- contradictions between tags and prose -----------------------------------------------


def _exclusive(rule: R.Exclusive, tags: set[str], prose: str) -> str | None:
    ta, tb = sorted(tags & rule.a.tags), sorted(tags & rule.b.tags)
    wa, wb = _spans(prose, (rule.a.words, rule.b.words))
    for t_own, t_other, w_own, w_other, own, other in (
        (ta, tb, wa, wb, rule.a, rule.b),
        (tb, ta, wb, wa, rule.b, rule.a),
    ):
        if t_own and not t_other and w_other and not w_own:
            return (
                f"the prose says {_quote(w_other)} ({other.label}) but the tags say "
                f"{_quote(t_own)} ({own.label})"
            )
    return None


_COLOUR_RES: dict[int, tuple[re.Pattern[str], re.Pattern[str], dict[str, set[str]]]] = {}


def _colour_re(rule: R.ColourRule) -> tuple[re.Pattern[str], re.Pattern[str], dict[str, set[str]]]:
    if (hit := _COLOUR_RES.get(id(rule))) is not None:
        return hit
    families: dict[str, set[str]] = {}
    for fam in rule.families:
        for w in fam.words:
            families.setdefault(w, set()).add(fam.name)
    colours = "|".join(re.escape(w) for w in sorted(families, key=len, reverse=True))
    adj = "|".join(re.escape(a) for a in sorted(rule.adjectives, key=len, reverse=True))
    span = re.compile(
        rf"(?<![\w-])(?:{colours})(?:[\s,]+(?:{adj}|{colours})|-)*[\s,-]+{re.escape(rule.part)}"
        r"(?![\w-])"
    )
    word = re.compile(rf"(?<![\w-])(?:{colours})(?![\w-])")
    _COLOUR_RES[id(rule)] = (span, word, families)
    return span, word, families


def _colour(rule: R.ColourRule, tags: set[str], prose: str) -> str | None:
    if tags & rule.wildcards:
        return None
    tag_fams: dict[str, list[str]] = {}
    for fam in rule.families:
        for t in sorted(tags & fam.tags):
            tag_fams.setdefault(fam.name, []).append(t)
    if not tag_fams:
        return None
    span, word, families = _colour_re(rule)
    said: dict[str, set[str]] = {}  # what the prose says ("red hair", "redhead") -> families
    for m in span.finditer(prose):
        for w in word.findall(m.group(0)):
            said[f"{w} {rule.part}"] = families[w]
    for w, fams in rule.standalone.items():
        if _words_re((w,)).search(prose):
            said[w] = set(fams)
    if not said:
        return None
    if any(fams & tag_fams.keys() for fams in said.values()):
        return None
    tagged = [t for ts in tag_fams.values() for t in ts]
    return f"the prose says {_quote(said)} but the tags say {_quote(tagged)}"


Range = tuple[int, float]


def tag_people(tags: set[str]) -> tuple[Range, str] | None:
    """(lowest, highest) number of people the tags say, and the tags that say it."""
    used: list[str] = []
    lo, hi, known = 0, 0.0, False
    for kind, table in (
        ("female", R.FEMALE_COUNT),
        ("male", R.MALE_COUNT),
        ("other", R.OTHER_COUNT),
    ):
        exact = [(n, t) for t, n in table.items() if t in tags]
        multi = [t for t, (k, _n) in R.MULTIPLE.items() if k == kind and t in tags]
        if exact:
            n, t = max(exact)
            known = True
            used.append(t)
            lo += n
            hi += math.inf if t.startswith("6+") else n
        elif multi:
            known = True
            used.append(multi[0])
            lo += 2
            hi = math.inf
    if "crowd" in tags:
        used.append("crowd")
        known, lo, hi = True, max(lo, 3), math.inf
    if tags & R.SOLO_TAGS:
        used.insert(0, "solo")
        lo, hi = max(lo, 1), (min(hi, 1) if known else 1)
        known = True
    if tags & R.NO_HUMANS_TAGS and not known:
        return (0, 0), "no humans"
    if not known or lo > hi:
        return None
    return (lo, hi), ", ".join(used)


@functools.cache
def _number_re() -> re.Pattern[str]:
    nums = "|".join(re.escape(n) for n in sorted(R.NUMBER_WORDS, key=len, reverse=True))
    nouns = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in R.PEOPLE_NOUNS)
    stop = "|".join(R.NUMBER_GAP_STOP)
    return re.compile(
        rf"(?<![\w-])({nums})\s+(?:(?!(?:{stop})\b)[a-z][\w'-]*\s+){{0,2}}(?:{nouns})(?![\w-])"
    )


def prose_people(prose: str) -> tuple[Range, str] | None:
    """(lowest, highest) number of people the prose names, and the words that say it."""
    lo, words = 0, []
    for m in _number_re().finditer(prose):
        n = R.NUMBER_WORDS[m.group(1)]
        if n >= lo:
            lo, words = n, [m.group(0)]
    crowd = _words_re(R.CROWD_PHRASES).search(prose)
    if crowd and lo < 3:
        lo, words = 3, [crowd.group(0)]
    alone = _words_re(R.ALONE_PHRASES).search(prose)
    if alone and not lo:
        return (1, 1), alone.group(0)
    if not lo:
        return None
    return (lo, math.inf), _quote(words, 1)


def _people_text(r: Range) -> str:
    lo, hi = r
    if hi == lo:
        return "1 person" if lo == 1 else f"{lo} people"
    return f"at least {lo} people" if hi == math.inf else f"{lo} to {int(hi)} people"


def _apart(a: Range, b: Range) -> bool:
    return a[0] > b[1] or b[0] > a[1]


# -- prose alone -------------------------------------------------------------------------


@functools.cache
def _echo_res(prompts: tuple[str, ...]) -> list[re.Pattern[str]]:
    pats = [re.compile(p, re.IGNORECASE) for p in (*R.ECHO_PATTERNS,)]
    for prompt in prompts:
        literal = max(re.split(r"\{[^}]*\}|<[^>]*>", prompt), key=len, default="")
        words = re.findall(r"[\w']+", literal.lower())
        if len(words) >= 4:
            pats.append(re.compile(r"[^\w']+".join(re.escape(w) for w in words[:8]), re.I))
    return pats


def _echo(r: Reading, prompts: tuple[str, ...]) -> str | None:
    for pat in _echo_res(prompts):
        if m := pat.search(r.text):
            return f"the prompt is echoed: '{_cut(m.group(0).strip(), 60)}'"
    return None


def _refusal(r: Reading) -> str | None:
    for p in R.REFUSAL_PATTERNS:
        if m := re.search(p, r.prose, re.IGNORECASE):
            return f"the describer declined: '{_cut(m.group(0), 60)}'"
    return None


def _repeated(line: str) -> str | None:
    rep = R.REPEAT
    words = re.findall(r"[\w'-]+", line.lower())
    run = 1
    for i in range(1, len(words)):
        run = run + 1 if words[i] == words[i - 1] else 1
        if run >= rep.run:
            return f"'{words[i]}' {run} times in a row"
    for n in range(rep.min_words, min(rep.max_words, len(words) // 2) + 1):
        need = rep.long_times if n >= rep.long_words else rep.times
        seen: dict[tuple[str, ...], int] = {}
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            c = seen[gram] = seen.get(gram, 0) + 1
            if c >= need:
                total = sum(1 for j in range(len(words) - n + 1) if tuple(words[j : j + n]) == gram)
                return f"'{_cut(' '.join(gram), 60)}' repeated {total} times"
    return None


_CLOSERS = "\"')]}»”’ "


def _cut_sentence(line: str) -> str | None:
    t = line.rstrip().rstrip(_CLOSERS)
    if not t:
        return None
    tail = _cut(" ".join(t.split()[-4:]), 50, left=True)
    if t[-1] not in R.TERMINAL:
        return f"ends in the middle of a sentence: '...{tail}'"
    body = t.rstrip(R.TERMINAL).rstrip()
    if body and body[-1] in ",;:-–—(":
        return f"ends in the middle of a sentence: '...{tail}'"
    last = re.findall(r"[\w'-]+", body.lower())
    if last and last[-1] in R.DANGLING_WORDS:
        return f"ends in the middle of a sentence: '...{tail}'"
    return None


def _language(r: Reading, language: str) -> str | None:
    prose = r.prose
    letters = [c for c in prose if c.isalpha()]
    if not letters or language not in R.STOPWORDS:
        return None
    for name, lo, hi in R.SCRIPTS:
        n = sum(1 for c in letters if lo <= ord(c) <= hi)
        if n / len(letters) >= 0.3:
            return f"written in {name} script, not in the configured language ({language})"
    words = re.findall(r"[^\W\d_]+", prose.lower())
    if len(words) < R.LANGUAGE_MIN_WORDS:
        return None
    scores = {lang: [w for w in words if w in sw] for lang, sw in R.STOPWORDS.items()}
    own = len(scores[language])
    best = max((lang for lang in scores if lang != language), key=lambda k: len(scores[k]))
    if len(scores[best]) >= 2 and len(scores[best]) > 2 * own:
        return (
            f"looks like '{best}' ({_quote(scores[best])}), not the configured language "
            f"({language})"
        )
    return None


def _cut(s: str, n: int, *, left: bool = False) -> str:
    if len(s) <= n:
        return s
    return "..." + s[-(n - 3) :] if left else s[: n - 3] + "..."


# -- one image ---------------------------------------------------------------------------


def check_readings(
    readings: Sequence[Reading], ctx: Context, prompts: dict[str, tuple[str, ...]] | None = None
) -> list[Finding]:
    """Every finding for one image's captions (several findings of one generator and
    check are joined into one)."""
    prompts = prompts or {}
    found: dict[tuple[str, str], list[str]] = {}
    digests: dict[str, str] = {}

    def flag(r: Reading, check: str, reason: str | None) -> None:
        if reason:
            found.setdefault((r.generator, check), []).append(reason)
            digests[r.generator] = r.content_hash

    by_content: dict[str, list[Reading]] = {}
    for r in readings:
        by_content.setdefault(r.content_hash, []).append(r)
    for r in readings:
        if r.empty:
            what = f" (only '{ctx.trigger.strip()}')" if ctx.trigger.strip() else ""
            flag(r, "empty", f"the caption is empty after post-processing{what}")
            continue
        same = by_content[r.content_hash]
        # The image's tags: multi_person's per-person tags describe crops (each one says
        # "solo") and are left out; its people count is used instead.
        tags: set[str] = set().union(
            *(o.tags for o in same if o.kind == "tags" and o.people is None)
        )
        detected = [o for o in same if o.people and o is not r]
        if r.kind == "tags":
            tp = tag_people(tags) if r.people and tags else None
            if tp is not None and r.people and _apart((r.people, r.people), tp[0]):
                flag(
                    r,
                    "people_count",
                    f"{_people_text((r.people, r.people))} detected "
                    f"(person markers) but the tags say {tp[1]} "
                    f"({_people_text(tp[0])})",
                )
            continue
        prose = _prose_for_rules(r.prose)
        if tags:
            for rule in R.EXCLUSIVE:
                flag(r, rule.check, _exclusive(rule, tags, prose))
            for rule in R.COLOURS:
                flag(r, rule.check, _colour(rule, tags, prose))
        tp = tag_people(tags) if tags else None
        if r.people:  # multi_person lines: the people it detected and described
            if tp is not None and _apart((r.people, r.people), tp[0]):
                flag(
                    r,
                    "people_count",
                    f"the caption describes "
                    f"{_people_text((r.people, r.people))} ({_quote(r.labels)}) but the "
                    f"tags say {tp[1]} ({_people_text(tp[0])})",
                )
        else:
            pp = prose_people(prose)
            if pp is not None and tp is not None and _apart(pp[0], tp[0]):
                flag(
                    r,
                    "people_count",
                    f"the prose says {pp[1]} ({_people_text(pp[0])}) "
                    f"but the tags say {tp[1]} ({_people_text(tp[0])})",
                )
            for d in detected:
                assert d.people is not None
                if pp is not None and _apart(pp[0], (d.people, d.people)):
                    flag(
                        r,
                        "people_count",
                        f"the prose says {pp[1]} ({_people_text(pp[0])}) "
                        f"but {d.generator} detected {_people_text((d.people, d.people))}",
                    )
        flag(r, "prompt_echo", _echo(r, prompts.get(r.generator, ())))
        flag(r, "refusal", _refusal(r))
        reps = [x for line in r.lines if (x := _repeated(line))]
        flag(r, "repetition", reps[0] if reps else None)
        cuts = [x for line in r.lines if (x := _cut_sentence(line))]
        flag(r, "cut_sentence", cuts[0] if cuts else None)
        flag(r, "language", _language(r, ctx.language))
    return [
        Finding(gen, check, "; ".join(dict.fromkeys(reasons)), digests[gen])
        for (gen, check), reasons in sorted(found.items())
    ]


# -- over the index ----------------------------------------------------------------------

CaptionRow = tuple  # (image_path, generator, content_hash, sidecar_path, sidecar_hash,
#                      written_at, text, text_hash): FileIndex.report_captions


class CheckIndex(Protocol):
    def caption_rows(self, image_paths: Iterable[str]) -> list[tuple]: ...
    def apply_checks(
        self, results: Iterable[tuple[str, str, list[tuple[str, str, str, str]]]]
    ) -> int: ...


def check_key(rows: Sequence[CaptionRow], fingerprint: str) -> str:
    """What an image's checks depend on: its caption records (which caption of which
    content, and the text's own hash when a person's edit was read back), the rules'
    version and the context (trigger word, language, how each generator writes)."""
    parts = sorted(f"{r[1]}\0{r[4]}\0{r[7] or ''}\0{r[6] is None}" for r in rows)
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{R.RULES_VERSION}\0{fingerprint}\0".encode())
    h.update("\1".join(parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass(slots=True)
class Checker:
    """Checks images' captions and keeps the flags in the index.

    ``sources``: how each generator writes (unknown generators are guessed from their
    text); ``context(path)``: the trigger word and language of an image's folder."""

    sources: dict[str, Source]
    context: Callable[[str], Context]
    _guessed: dict[str, Source] = field(default_factory=dict)

    def fingerprint(self, ctx: Context) -> str:
        srcs = "|".join(f"{n}={s.fingerprint()}" for n, s in sorted(self.sources.items()))
        return f"{ctx.trigger}\0{ctx.language}\0{srcs}"

    def source(self, name: str, text: str) -> Source:
        """The generator's source; one that is not configured is guessed from its
        first caption seen (remembered, and not part of the fingerprint)."""
        src = self.sources.get(name) or self._guessed.get(name)
        if src is None:
            src = self._guessed[name] = guess_source(name, text)
        return src

    def findings(
        self, path: str, rows: Sequence[CaptionRow], ctx: Context | None = None
    ) -> list[Finding]:
        ctx = ctx or self.context(path)
        readings = []
        prompts: dict[str, tuple[str, ...]] = {}
        for row in rows:
            text = row[6]
            if text is None:  # recorded before captiond kept texts
                continue
            src = self.source(row[1], text)
            prompts[src.name] = src.prompts
            readings.append(read_caption(src, text, row[2], ctx))
        return check_readings(readings, ctx, prompts)

    def results(
        self, grouped: dict[str, list[CaptionRow]], ctx: Context | None = None
    ) -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
        """(path, key, flags) per image; ``ctx``: the context of them all when the caller
        knows it (one folder), else looked up per image."""
        out = []
        fps: dict[Context, str] = {}
        for path, rows in grouped.items():
            c = ctx or self.context(path)
            fp = fps.get(c) or fps.setdefault(c, self.fingerprint(c))
            flags = [
                (f.generator, f.check, f.reason, f.content_hash)
                for f in self.findings(path, rows, c)
            ]
            out.append((path, check_key(rows, fp), flags))
        return out

    def stale(
        self,
        grouped: dict[str, list[CaptionRow]],
        keys: dict[str, str],
        ctx: Context | None = None,
    ) -> list[str]:
        """The images whose captions changed since they were last checked."""
        fps: dict[Context, str] = {}
        out = []
        for path, rows in grouped.items():
            c = ctx or self.context(path)
            fp = fps.get(c) or fps.setdefault(c, self.fingerprint(c))
            if keys.get(path) != check_key(rows, fp):
                out.append(path)
        return out


def group_rows(rows: Iterable[CaptionRow]) -> dict[str, list[CaptionRow]]:
    out: dict[str, list[CaptionRow]] = {}
    for row in rows:
        out.setdefault(row[0], []).append(row)
    return out


def check_images(index: CheckIndex, checker: Checker, paths: Iterable[str]) -> int:
    """Check these images' captions as the index has them and store the flags; returns
    the number of flags new or re-opened. Reads the index only."""
    grouped = group_rows(index.caption_rows(paths))
    return index.apply_checks(checker.results(grouped)) if grouped else 0


def source_of(name: str, generator: Any) -> Source:
    """How a loaded generator writes (its caption type and multi_person's mode)."""
    cfg = getattr(generator, "config", None)
    prompts = tuple(
        p
        for p in (
            getattr(generator, "prompt", None),
            getattr(cfg, "prompt", None),
            getattr(cfg, "person_prompt", None),
            getattr(cfg, "scene_prompt", None),
            getattr(cfg, "whole_prompt", None),
        )
        if isinstance(p, str) and p
    )
    mode = getattr(cfg, "mode", None)
    aliases = tuple(a for a in (getattr(cfg, "aliases", None) or ()) if isinstance(a, str) and a)
    if mode == "lora_tags":
        return Source(
            name,
            "tags",
            "markers",
            aliases,
            str(getattr(cfg, "tag_alias", "person{n}")),
            str(getattr(cfg, "scene_tag", "scene")),
            prompts,
        )
    if mode == "fine_tune_caption":
        return Source(
            name,
            "prose",
            "lines",
            aliases,
            scene=str(getattr(cfg, "scene_label", "Scene")),
            prompts=prompts,
        )
    kind = "tags" if getattr(generator, "caption_type", "tags") == "tags" else "prose"
    return Source(name, kind, prompts=prompts)
