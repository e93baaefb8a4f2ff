"""Counting CLIP text-encoder tokens: which captions a trainer's CLIP would cut at 77.

CLIP's text encoder takes 77 tokens, the start and end tokens included: 75 for the
caption. With the tokenizer files of a CLIP model in a Hugging Face cache
(``<cache_dir>/hf`` or the user's) or a local folder, and the ``tokenizers`` library
installed (a dependency of ``transformers``), captions are counted with that tokenizer
(:class:`ClipCounter`); otherwise with :func:`estimate`, and the report says it is an
estimate.

The tokenizer is loaded with ``tokenizers`` alone (Rust, about 30 MB with CLIP's
vocabulary), never through ``transformers``: importing ``transformers`` imports
``torch`` (about 500 MB), and the report's background pass runs in the daemon, whose
memory must stay where it was (tests/test_heavy_e2e.py). The pipeline is the one
``transformers``' ``CLIPTokenizer`` builds (its ``tokenizer.json`` as saved, or built
from ``vocab.json`` and ``merges.txt`` the same way), so the counts are the same.

Counting 100,000 captions with the tokenizer takes tens of seconds on a small machine,
so it is only asked where the answer is not already known: CLIP splits text into
pieces (words, single digits, runs of punctuation) before BPE, and every piece is at
least one token and at most one token per byte. A caption of more than 75 pieces is
over the limit and one of at most 75 bytes is within it, without the tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
    _CLIP_PIECES = True  # the same pieces as CLIP's pre-tokenizer
except ImportError:  # pragma: no cover - the estimate is an estimate either way
    _PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")
    _CLIP_PIECES = False

# Texts whose CLIP pieces bound their tokens: printable ASCII, spaces, tabs and newlines
# (nothing for CLIP's NFC or lower-casing to merge), without "<|" (its special tokens,
# one token each, are matched before the pieces).
_PLAIN = re.compile(r"(?:[\x20-\x7e\t\n](?<!<\|))*")


def encode_on_the_callers_thread() -> None:
    """Have ``tokenizers`` encode on the calling thread instead of its own thread pool,
    unless ``TOKENIZERS_PARALLELISM`` is set. The pool's threads take the priority of
    the thread that first used it: after a report asked at normal priority, the
    background facts pass (nice 19) would encode at normal priority on every core,
    beside the captioning. Call before the first encode (some versions read it once)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Texts encoded at once: an encoding holds ids, offsets, masks; 100,000 at once took
# more than 1 GB (and the allocator keeps it), 1,024 at a time about 20 MB.
ENCODE_CHUNK = 1024

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
    key = None  # what the facts' key names (daemon.report.facts.key_term)
    exact = False
    note = (
        "estimate: no CLIP tokenizer was found in the cache (words and punctuation "
        "counted, long words as several tokens); install tokenizers (the report or vlm "
        "extra) and cache a CLIP tokenizer (e.g. openai/clip-vit-large-patch14) for "
        "exact counts"
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

    def __init__(
        self, tokenizer: Any, name: str, *, key: str | None = None, memo: int = 100_000
    ) -> None:
        """``tokenizer``: a ``tokenizers.Tokenizer`` (or a ``transformers`` tokenizer,
        whose ``backend_tokenizer`` is one). ``key``: what the facts' key names (the
        name and a digest of the tokenizer's files); the name by default."""
        self.tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.name = name
        self.key = key or name
        self.note = f"counted with the CLIP tokenizer of {name}"
        self._memo: OrderedDict[bytes, int] = OrderedDict()
        self._memo_size = memo
        self._lock = threading.Lock()

    def _tokenize(self, texts: Sequence[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), ENCODE_CHUNK):  # encodings are large: a few at once
            batch = list(texts[i : i + ENCODE_CHUNK])
            encoded = self.tokenizer.encode_batch(batch, add_special_tokens=False)
            out += [len(e.ids) for e in encoded]
        return out

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
            if lo <= LIMIT < hi and _CLIP_PIECES and _PLAIN.fullmatch(t):
                # every CLIP piece is at least one token and at most one per byte
                lo, hi = bounds(t)
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


def _snapshots(cache: Path, repo: str) -> list[Path]:
    """The folders of ``repo`` in the hub cache ``cache``: the snapshot ``refs/main``
    names first, then any other, newest first."""
    base = cache / ("models--" + repo.replace("/", "--"))
    out: list[Path] = []
    with contextlib.suppress(OSError, ValueError):
        out.append(base / "snapshots" / (base / "refs" / "main").read_text().strip())
    try:
        others = sorted(
            (base / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True
        )
    except OSError:
        others = []
    return out + [p for p in others if p not in out]


def _digest(files: Iterable[Path]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def load_folder(folder: Path, name: str | None = None) -> ClipCounter | None:
    """A :class:`ClipCounter` for the CLIP tokenizer in ``folder`` (``tokenizer.json``,
    else ``vocab.json`` and ``merges.txt``), with ``tokenizers`` only; None when there is
    none, it is not CLIP's, or ``tokenizers`` is not installed."""
    name = name or str(folder)
    tj, vocab, merges = (folder / f for f in ("tokenizer.json", "vocab.json", "merges.txt"))
    files = [tj] if tj.is_file() else [vocab, merges]
    if not all(f.is_file() for f in files):
        return None
    cls = ""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        cls = str(json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class"))
    if cls and cls != "None" and "clip" not in cls.lower():
        log.warning("not_a_clip_tokenizer", repo=name, cls=cls)
        return None
    try:
        import tokenizers
        from tokenizers.models import BPE

        if tj.is_file():
            tok = tokenizers.Tokenizer.from_file(str(tj))
        else:
            tok = clip_tokenizer(str(vocab), str(merges))
        model = tok.model
    except ImportError:
        return None
    except Exception as exc:  # unreadable or not a tokenizer
        log.warning("clip_tokenizer_unreadable", repo=name, error=str(exc))
        return None
    # CLIP's: byte-level BPE marking the end of a word, at least the 256 bytes
    if (
        not isinstance(model, BPE)
        or model.end_of_word_suffix != "</w>"
        or tok.get_vocab_size(with_added_tokens=False) < 256
    ):
        log.warning("not_a_clip_tokenizer", repo=name, cls=cls or type(model).__name__)
        return None
    return ClipCounter(tok, name, key=f"{name} {_digest(files)}")


def clip_tokenizer(vocab: str, merges: str) -> Any:
    """CLIP's tokenizer from ``vocab.json`` and ``merges.txt``, as ``transformers``'
    ``CLIPTokenizer`` builds it (tokenizers only)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    unk, specials = "<|endoftext|>", ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(
        BPE.from_file(
            vocab,
            merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.add_special_tokens(specials)
    return tok


def _load(dirs: Sequence[str], repos: Sequence[str]) -> Counter:
    from huggingface_hub import constants  # the user's hub cache, as the hub finds it

    caches = [Path(d) for d in dirs] + [Path(constants.HF_HUB_CACHE)]
    for repo in repos:
        local = Path(repo)
        folders = [local] if local.is_dir() else []
        folders += [s for c in caches for s in _snapshots(c, repo)]
        for folder in folders:
            counter = load_folder(folder, repo)
            if counter is not None:
                log.info("clip_tokenizer", repo=repo, folder=str(folder))
                return counter
    return Estimator()
