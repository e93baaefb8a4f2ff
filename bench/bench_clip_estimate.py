"""How close the report's CLIP token estimate comes to the real CLIP tokenizer.

Run: ``.venv/bin/python bench/bench_clip_estimate.py --clip-dir DIR``, where DIR holds a
CLIP tokenizer (``AutoTokenizer.from_pretrained(DIR)``). Without network, build one from
the BPE vocabulary that open_clip ships (the original OpenAI CLIP vocabulary)::

    pip download --no-deps -d /tmp/oc open-clip-torch
    python bench/bench_clip_estimate.py --build-from /tmp/oc/open_clip_torch-*.whl \\
        --clip-dir /tmp/clip-tokenizer

600 captions: 400 WD-style tag lists (5-45 tags of 100 common Danbooru tags) and 200
VLM-style paragraphs (1-4 sentences); seeded, so every run measures the same texts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.report.tokens import LIMIT, estimate

_TAGS_TEXT = """
1girl solo long_hair looking_at_viewer smile open_mouth blue_eyes blonde_hair shirt skirt
simple_background brown_hair black_hair hair_ornament red_eyes long_sleeves
white_background dress bow holding twintails very_long_hair jewelry short_hair
closed_mouth standing medium_breasts green_eyes thighhighs purple_eyes school_uniform
sitting jacket flower hat outdoors full_body white_shirt cowboy_shot sky day cloud tree
blue_sky grass nature scenery indoors bangs hair_between_eyes pleated_skirt serafuku
sailor_collar neckerchief ribbon hair_ribbon upper_body parted_lips multiple_girls 2girls
1boy male_focus glasses earrings necklace wings animal_ears cat_ears tail fox_ears kimono
japanese_clothes sword weapon armor gloves boots pantyhose black_legwear frills
detached_sleeves bare_shoulders collarbone"""
TAGS = _TAGS_TEXT.split()
PROSE = [
    "A young woman with long blonde hair stands in a sunny park, wearing a white dress and "
    "smiling at the camera.",
    "The image shows a man in a dark suit sitting at a wooden desk in a modern office, "
    "reading documents.",
    "A close-up photograph of a ginger cat sleeping on a knitted blanket beside a window "
    "with morning light.",
    "An anime-style illustration of a girl with twin tails and red eyes, holding a katana "
    "against a cherry blossom background.",
    "Two children play with a golden retriever on a sandy beach while waves crash in the "
    "distance under a cloudy sky.",
]


def captions() -> list[str]:
    rng = random.Random(1)
    out = [", ".join(t.replace("_", " ") for t in rng.sample(TAGS, rng.randint(5, 45)))
           for _ in range(400)]  # fmt: skip
    out += [" ".join(rng.sample(PROSE, rng.randint(1, 4))) for _ in range(200)]
    return out


def build(wheel: Path, dest: Path) -> None:
    """A CLIPTokenizer folder from open_clip's bpe_simple_vocab_16e6.txt.gz, as
    transformers' conversion of OpenAI's CLIP builds its vocab.json and merges."""
    from transformers import CLIPTokenizer

    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode()
    merges = [tuple(m.split()) for m in raw.split("\n")[1 : 49152 - 256 - 2 + 1]]
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    base = [chr(c) for c in cs]
    vocab = [*base, *(v + "</w>" for v in base), *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(dest))
    (dest / "captiond-source.json").write_text(json.dumps({"from": wheel.name}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-dir", type=Path, required=True)
    ap.add_argument("--build-from", type=Path, help="an open-clip-torch wheel")
    args = ap.parse_args()
    if args.build_from:
        build(args.build_from, args.clip_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.clip_dir))
    texts = captions()
    real = [len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    est = [estimate(t) for t in texts]
    err = [e - r for e, r in zip(est, real, strict=True)]
    rel = sorted(abs(e - r) / r for e, r in zip(est, real, strict=True))
    wrong = sum((e > LIMIT) != (r > LIMIT) for e, r in zip(est, real, strict=True))
    over = sum(r > LIMIT for r in real)
    print(f"{len(texts)} captions; real tokens {min(real)}-{max(real)}; over {LIMIT}: {over}")
    p95 = 100 * rel[int(0.95 * len(rel))]
    print(f"estimate - real: mean {sum(err) / len(err):+.2f} tokens; mean |error| "
          f"{100 * sum(rel) / len(rel):.1f}%, 95th percentile {p95:.1f}%")  # fmt: skip
    print(f"on the wrong side of the limit: {wrong} of {len(texts)}")


if __name__ == "__main__":
    main()
