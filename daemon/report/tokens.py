"""Counting CLIP text-encoder tokens: which captions a trainer's CLIP would cut at 77.

CLIP's text encoder takes 77 tokens, the start and end tokens included: 75 for the
caption. With ``transformers`` installed and the tokenizer files of a CLIP model in a
Hugging Face cache (``<cache_dir>/hf`` or the user's), captions are counted with that
tokenizer (:class:`ClipCounter`); otherwise with :func:`estimate`, and the report says
it is an estimate.

Counting 100,000 captions with the tokenizer takes tens of seconds on a small machine,
so it is only asked where the answer is not already known: CLIP splits text into
pieces (words, single digits, runs of punctuation) before BPE, and every piece is at
least one token and at most one token per byte. A caption of more than 75 pieces is
over the limit and one of at most 75 bytes is within it, without the tokenizer.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

CLIP_MAX_TOKENS = 77  # the text encoder's context, start and end tokens included
LIMIT = CLIP_MAX_TOKENS - 2  # tokens a caption may use
DEFAULT_REPOS = (
    "openai/clip-vit-large-patch14",
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14-336",
)

try:  # transformers requires the regex module; CLIP's own pattern needs \p{L}
    import regex as _regex

    _PIECES = _regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
except ImportError:  # pragma: no cover - the estimate is an estimate either way
    _PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")

# Estimate: letters per token of a word piece, from the real tokenizer on WD tag lists
# and VLM prose (bench/README.md, CLIP tokens): common words are one token, long and
# rare words several.
_LETTERS_PER_TOKEN = 8


def pieces(text: str) -> list[str]:
    """CLIP's pre-tokenizer pieces of ``text`` (lower-cased, whitespace collapsed)."""
    return _PIECES.findall(" ".join(text.lower().split()))


def bounds(text: str) -> tuple[int, int]:
    """(fewest, most) tokens ``text`` can take, without the tokenizer."""
    ps = pieces(text)
    return len(ps), sum(len(p.encode("utf-8")) for p in ps)


# Punctuation and digits: each one CLIP piece (a run of marks is one; close enough).
_SINGLE = str.maketrans("", "", ",.;:!?()[]{}\"'/&*+=<>|\\_~#%@^-0123456789")


_LONG = re.compile(r"\S{10,}")


def estimate_words(text: str) -> tuple[int, int]:
    """(:func:`estimate` of ``text``, its words). String counting, no per-word loop:
    a report estimates 100,000 captions in well under a second."""
    words = len(text.split())
    n = words + len(text) - len(text.translate(_SINGLE))
    for w in _LONG.findall(text):
        n += (len(w) - 2) // _LETTERS_PER_TOKEN
    return n, words


def estimate(text: str) -> int:
    """Tokens ``text`` probably takes (without the start and end tokens): each word one,
    one more per 8 letters past the first 9 or so, each digit and each punctuation mark
    one."""
    return estimate_words(text)[0]


class Estimator:
    """Token counts by :func:`estimate` (no tokenizer)."""

    name = None
    exact = False
    note = (
        "estimate: no CLIP tokenizer was found in the cache (words and punctuation "
        "counted, long words as several tokens); install transformers and cache a CLIP "
        "tokenizer (e.g. openai/clip-vit-large-patch14) for exact counts"
    )

    def counts(self, texts: Sequence[str]) -> list[int]:
        return [estimate(t) for t in texts]

    def over(self, texts: Sequence[str]) -> list[bool]:
        return [estimate(t) > LIMIT for t in texts]

    def over_words(self, texts: Sequence[str]) -> tuple[list[bool], list[int]]:
        """:meth:`over` and the words of each text, in one pass."""
        both = [estimate_words(t) for t in texts]
        return [n > LIMIT for n, _w in both], [w for _n, w in both]


class ClipCounter:
    """Token counts by a real CLIP tokenizer; remembered by text (a report's texts
    rarely change between two reports)."""

    exact = True

    def __init__(self, tokenizer: Any, name: str, *, memo: int = 500_000) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.note = f"counted with the CLIP tokenizer of {name}"
        self._memo: OrderedDict[bytes, int] = OrderedDict()
        self._memo_size = memo
        self._lock = threading.Lock()

    def _tokenize(self, texts: Sequence[str]) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(i) for i in ids]

    def counts(self, texts: Sequence[str]) -> list[int]:
        keys = [
            hashlib.blake2b(t.encode("utf-8", "replace"), digest_size=12).digest() for t in texts
        ]
        out: list[int | None] = [None] * len(texts)
        todo: list[int] = []
        with self._lock:
            for i, k in enumerate(keys):
                hit = self._memo.get(k)
                if hit is None:
                    todo.append(i)
                else:
                    out[i] = hit
        if todo:
            got = self._tokenize([texts[i] for i in todo])
            with self._lock:
                for i, n in zip(todo, got, strict=True):
                    out[i] = n
                    self._memo[keys[i]] = n
                while len(self._memo) > self._memo_size:
                    self._memo.popitem(last=False)
        return [int(n or 0) for n in out]

    def over(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text is over the limit; the tokenizer only runs where the
        pieces do not already tell."""
        out: list[bool] = []
        ask: list[int] = []
        for i, t in enumerate(texts):
            # every word is at least one token; no token is shorter than a byte
            lo, hi = len(t.split()), len(t.encode("utf-8", "replace"))
            out.append(lo > LIMIT)
            if lo <= LIMIT < hi:
                ask.append(i)
        for i, n in zip(ask, self.counts([texts[i] for i in ask]), strict=True):
            out[i] = n > LIMIT
        return out

    def over_words(self, texts: Sequence[str]) -> tuple[list[bool], list[int]]:
        return self.over(texts), [len(t.split()) for t in texts]


Counter = Estimator | ClipCounter

_cached: dict[tuple[str, ...], Counter] = {}
_cached_lock = threading.Lock()


def find_counter(
    cache_dirs: Iterable[Path | None], repos: Sequence[str] = DEFAULT_REPOS
) -> Counter:
    """A :class:`ClipCounter` for the first CLIP tokenizer found (a repo in one of the
    Hugging Face caches, or a local folder), else an :class:`Estimator`. Looked up once
    per process and set of places; never downloads."""
    dirs = tuple(str(d) for d in cache_dirs if d is not None)
    key = (*dirs, "|", *repos)
    with _cached_lock:
        if key in _cached:
            return _cached[key]
        counter = _load(dirs, repos)
        _cached[key] = counter
        return counter


def _load(dirs: Sequence[str], repos: Sequence[str]) -> Counter:
    try:
        from transformers import AutoTokenizer
    except Exception:  # not installed, or broken
        return Estimator()
    for repo in repos:
        places: list[dict[str, Any]] = [{}] if Path(repo).is_dir() else []
        places += [{"cache_dir": d} for d in dirs] + ([] if Path(repo).is_dir() else [{}])
        for kw in places:
            try:
                tok = AutoTokenizer.from_pretrained(repo, local_files_only=True, **kw)
            except Exception:
                continue
            if "clip" not in type(tok).__name__.lower():
                log.warning("not_a_clip_tokenizer", repo=repo, cls=type(tok).__name__)
                continue
            log.info("clip_tokenizer", repo=repo, cache_dir=kw.get("cache_dir"))
            return ClipCounter(tok, repo)
    return Estimator()
