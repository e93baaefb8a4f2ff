"""CLIP token counts for the report without ``transformers`` (issue 14): the daemon's
background facts pass loads a cached CLIP tokenizer with ``tokenizers`` alone, so the
daemon never imports ``transformers`` or ``torch`` (about 500 MB that stayed after a
heavy model's unload: tests/test_heavy_e2e.py), and counts as ``transformers`` would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.report import facts as F
from daemon.report.checks import Context, Source
from daemon.report.tokens import LIMIT, ClipCounter, Estimator, find_counter, load_folder
from tests.deps import require

REPO = "openai/clip-vit-large-patch14"
WORDS = ["red", "hair", "girl", "solo", "a", "the", "with", "long", "sks"]


def write_clip_files(folder: Path) -> None:
    """A tiny CLIP tokenizer (vocab.json, merges.txt): the 256 byte symbols, with and
    without the end-of-word mark, and merges for :data:`WORDS` only, so any other word
    is a token per letter (where the estimate says one or two)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for s in alphabet + [a + "</w>" for a in alphabet]:
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    for w in WORDS:
        symbols = [*w[:-1], w[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur += s
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def hub_snapshot(cache: Path, repo: str = REPO, commit: str = "0" * 40) -> Path:
    """The folder of ``repo`` at ``commit`` in a Hugging Face hub cache, refs/main set."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return base / "snapshots" / commit


TEXTS = [
    "red hair, girl, solo",
    "A girl with long red hair.",
    "xyzzy quux " * 10,  # 20 words, 90 tokens here
    "Ünïcödé  café\tnaïve 日本語 <|endoftext|> 12345 it's (masterpiece:1.2)",
    "",
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from daemon.config import Settings
    from daemon.queue import CaptionRecord, Database, FileIndex, JobQueue
    from daemon.report import facts as F
    from daemon.report.checks import Source
    from daemon.report.service import ReportService
    from daemon.report.tokens import find_counter

    tmp, root = Path(sys.argv[1]), "/data/ds"
    db = Database(tmp / "q.db")
    index = FileIndex(db)
    texts = {"short": "red hair, girl, solo", "long": "xyzzy quux " * 10}
    index.upsert_files(root, [("", n + ".png", 1, 1) for n in texts])
    index.record_captions([CaptionRecord(f"{root}/{n}.png", "vlm", f"{i:032x}",
                                         f"{root}/{n}.txt", "s", 0.0, text=t)
                           for i, (n, t) in enumerate(texts.items())])
    settings = Settings(state_dir=tmp, cache_dir=tmp / "cache",
                        watch=[{"path": root, "name": "ds", "trigger_word": "sks"}])
    svc = ReportService(settings=settings, index=index, queue=JobQueue(db),
                        sources=lambda: {"vlm": Source("vlm", "prose")})
    done = svc.fill_facts()
    tokens = find_counter([settings.cache_dir / "hf", None], settings.report.clip_tokenizers)
    over = {p.rsplit("/", 1)[1]: bool(F.HEAD.unpack_from(f)[1] & F.OVER)
            for p, _g, f in db.conn.execute("SELECT image_path, generator, facts FROM captions")}
    print(json.dumps({"done": done, "counter": type(tokens).__name__, "key": tokens.key,
                      "over": over,
                      "modules": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
    """
)


def run_pass(tmp: Path, env: dict[str, str] | None = None) -> dict:
    """The daemon's background facts pass (``ReportService.fill_facts``), in a fresh
    interpreter, as the daemon runs it."""
    e = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    e["HF_HUB_CACHE"] = str(tmp / "user-hub")  # not this machine's own cache
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp)],
        cwd=tmp,
        env={**e, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_background_pass_counts_with_clip_and_imports_no_torch(tmp_path: Path) -> None:
    require("tokenizers", "the vlm extra (transformers' dependency)")
    write_clip_files(hub_snapshot(tmp_path / "cache" / "hf"))
    got = run_pass(tmp_path)
    assert got["counter"] == "ClipCounter"
    assert got["key"].startswith(REPO + " ")  # the name and a digest of the files
    assert got["done"] == 2
    # the real count decides: 20 words the estimate puts within 75 tokens, 90 here
    assert got["over"] == {"short.png": False, "long.png": True}
    assert got["modules"] == []  # neither torch nor transformers in the daemon


def test_the_background_pass_without_a_tokenizer_imports_no_torch(tmp_path: Path) -> None:
    got = run_pass(tmp_path)
    assert (got["counter"], got["key"], got["done"]) == ("Estimator", None, 2)
    assert got["over"] == {"short.png": False, "long.png": False}  # the estimate: 20 words
    assert got["modules"] == []


def test_the_users_hub_cache_is_looked_in(tmp_path: Path) -> None:
    require("tokenizers", "the vlm extra (transformers' dependency)")
    write_clip_files(hub_snapshot(tmp_path / "user-hub", "openai/clip-vit-base-patch32"))
    got = run_pass(tmp_path)
    assert got["counter"] == "ClipCounter"
    assert got["key"].startswith("openai/clip-vit-base-patch32 ")
    assert got["modules"] == []


@pytest.mark.parametrize("saved", ["tokenizer.json", "vocab.json and merges.txt"])
def test_counts_are_those_of_transformers(tmp_path: Path, saved: str) -> None:
    """The same ids as transformers' CLIPTokenizer, from either form of its files."""
    require("transformers", "the vlm extra")
    from transformers import AutoTokenizer, CLIPTokenizer

    write_clip_files(tmp_path / "src")
    folder = tmp_path / "src"
    if saved == "tokenizer.json":
        CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(str(tmp_path / "saved"))
        folder = tmp_path / "saved"
        for f in ("vocab.json", "merges.txt"):
            (folder / f).unlink(missing_ok=True)
        theirs = AutoTokenizer.from_pretrained(str(folder))
    else:
        theirs = CLIPTokenizer.from_pretrained(str(folder))
    ours = load_folder(folder, "tiny")
    assert ours is not None
    want = theirs(TEXTS, add_special_tokens=False)["input_ids"]
    got = [e.ids for e in ours.tokenizer.encode_batch(TEXTS, add_special_tokens=False)]
    assert got == want
    assert ours.counts(TEXTS) == [len(i) for i in want]
    assert ours.counts(TEXTS)[2] == 90 > LIMIT


def test_not_clip_tokenizers_are_refused(tmp_path: Path) -> None:
    require("tokenizers", "the vlm extra (transformers' dependency)")
    from tokenizers import Tokenizer
    from tokenizers.models import BPE, WordLevel

    assert load_folder(tmp_path) is None  # no files
    gpt2 = tmp_path / "gpt2"  # a BPE without CLIP's end-of-word mark
    gpt2.mkdir()
    Tokenizer(BPE({f"t{i}": i for i in range(300)}, [])).save(str(gpt2 / "tokenizer.json"))
    assert load_folder(gpt2) is None
    words = tmp_path / "words"
    words.mkdir()
    Tokenizer(WordLevel({"a": 0}, unk_token="a")).save(str(words / "tokenizer.json"))
    assert load_folder(words) is None
    empty = tmp_path / "empty"  # CLIP's pipeline, no vocabulary (a broken save)
    write_clip_files(empty)
    (empty / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (empty / "merges.txt").write_text("#version: 0.2\n")
    assert load_folder(empty) is None
    other = tmp_path / "other"
    write_clip_files(other)
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    assert load_folder(other) is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    assert load_folder(broken) is None


def test_the_facts_key_changes_with_the_counter(tmp_path: Path) -> None:
    """Facts counted by one tokenizer (or the estimate) are not taken for another's."""
    require("tokenizers", "the vlm extra (transformers' dependency)")
    write_clip_files(tmp_path / "a")
    write_clip_files(tmp_path / "b")
    (tmp_path / "b" / "merges.txt").write_text("#version: 0.2\nr e\n")  # other merges
    a, b = load_folder(tmp_path / "a", REPO), load_folder(tmp_path / "b", REPO)
    assert a is not None and b is not None
    src, ctx = Source("vlm", "prose"), Context(trigger="sks", language="en")
    keys = {F.key_term(src, ctx, t) for t in (Estimator(), a, b, load_folder(tmp_path / "a"))}
    assert len(keys) == 4
    assert F.key_term(src, ctx, a) == F.key_term(src, ctx, load_folder(tmp_path / "a", REPO))


def test_find_counter_falls_back_to_the_estimate(tmp_path: Path) -> None:
    assert isinstance(find_counter([tmp_path], ["no/such-repo"]), Estimator)
    assert isinstance(find_counter([tmp_path], [str(tmp_path)]), Estimator)  # empty folder
    require("tokenizers", "the vlm extra (transformers' dependency)")
    write_clip_files(tmp_path / "local")  # a local folder named as the repo
    assert isinstance(find_counter([], [str(tmp_path / "local")]), ClipCounter)


def test_over_asks_the_tokenizer_only_where_the_pieces_do_not_tell(tmp_path: Path) -> None:
    """CLIP's pieces bound a plain ASCII text's tokens; the answer is the tokenizer's
    either way (special tokens, which are one token each, and other text are asked)."""
    require("tokenizers", "the vlm extra (transformers' dependency)")
    write_clip_files(tmp_path)
    counter = load_folder(tmp_path)
    assert counter is not None
    texts = [
        ", ".join(["red_hair"] * 30),  # 30 words, 119 pieces: over
        "a " * 40,  # 40 words, 40 bytes of pieces: within
        "solo, " * 20,  # 20 words, 40 pieces, 80 bytes: the tokenizer
        "<|endoftext|> " * 40,  # 40 special tokens: within (120 pieces say over)
        "naïve, " * 30,  # not ASCII: the tokenizer
        "x'll it's\t(a_b)...!!\n" * 9,  # 81 pieces (quotes, runs of marks): over
    ]
    asked: list[str] = []
    tokenize = counter._tokenize
    counter._tokenize = lambda ts: (asked.extend(ts), tokenize(ts))[1]  # type: ignore[method-assign]
    got = counter.over(texts)
    assert asked == texts[2:5]
    assert got == [n > LIMIT for n in counter.counts(texts)]
    assert got == [True, False, False, False, True, True]


POOL_THREADS = r"""
import os, sys
from daemon.report.tokens import encode_on_the_callers_thread
encode_on_the_callers_thread()
from tokenizers import Tokenizer, models, pre_tokenizers
tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.encode_batch(["a b " * 50] * 20000)  # at normal priority, as a report request would
print(len(os.listdir("/proc/self/task")))
"""


@pytest.mark.parametrize(("env", "pool"), [(None, False), ("true", True)])
def test_the_tokenizer_encodes_on_the_callers_thread(env: str | None, pool: bool) -> None:
    """No pool of tokenizer threads at the priority of whoever encoded first: the niced
    background pass then encodes at nice 19 on its own thread. A user's explicit
    TOKENIZERS_PARALLELISM rules."""
    require("tokenizers", "the vlm extra (transformers' dependency)")
    environ = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if env is not None:
        environ["TOKENIZERS_PARALLELISM"] = env
    out = subprocess.run(
        [sys.executable, "-c", POOL_THREADS],
        capture_output=True,
        text=True,
        env=environ,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
        check=True,
    )
    threads = int(out.stdout.strip())
    assert (threads > 1) is pool, threads
