from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from daemon.text import postprocess
from daemon.text import vlm as vlm_text
from daemon.text.postprocess import PostContext
from daemon.text.vlm import clean_vlm_output, split_sentences, truncate_words

CTX = PostContext(caption_type="caption")

# (raw model output, prompt, expected) — shapes seen from Florence-2, LLaVA, JoyCaption,
# SmolVLM, Qwen2.5-VL and BLIP-style captioners.
CASES = [
    ("The image shows a cat sitting on a windowsill", "", "A cat sitting on a windowsill."),
    ("this image shows two dogs playing in the snow.", "", "Two dogs playing in the snow."),
    ("This is a picture of a red car parked on a street", "", "A red car parked on a street."),
    ("In the image, a woman is holding an umbrella.", "", "A woman is holding an umbrella."),
    ("The picture depicts a quiet mountain lake at dawn.", "", "A quiet mountain lake at dawn."),
    ("In this image we can see a person, a tree and the sky.", "", "A person, a tree and the sky."),
    ("In this image, there are three apples on a table", "", "Three apples on a table."),
    ("We can see a horse in a field.", "", "A horse in a field."),
    ("I see two cups on a table", "", "Two cups on a table."),
    ("The person in the photo is sitting on a bench", "", "Sitting on a bench."),
    ("THE IMAGE SHOWS a bowl of fruit.", "", "A bowl of fruit."),
    ("This is an image of a lighthouse on a cliff!", "", "A lighthouse on a cliff!"),
    ("The image features a young man in a blue jacket.", "", "A young man in a blue jacket."),
    (
        "Describe this image. A girl with long hair smiling",
        "Describe this image.",
        "A girl with long hair smiling.",
    ),
    (
        "USER: describe the image ASSISTANT: a dog on a beach",
        "",
        "A dog on a beach.",
    ),
    ("ASSISTANT: a bicycle leaning against a wall", "", "A bicycle leaning against a wall."),
    ("<s> Assistant: the photo shows a bridge at night", "", "A bridge at night."),
    ("Caption: A cup of coffee on a wooden desk", "", "A cup of coffee on a wooden desk."),
    ("  a   man\n\nriding   a horse  ", "", "A man riding a horse."),
    ("A child flying a kite,", "", "A child flying a kite."),
    ('She said "hello."', "", 'She said "hello."'),
    # Not boilerplate: "The image" as a subject of its own sentence is kept.
    ("The imagery is dark and moody.", "", "The imagery is dark and moody."),
    ("Image shows nothing recognisable", "", "Image shows nothing recognisable."),
    # Stripping must never leave an empty caption.
    ("The image shows", "", "The image shows."),
    ("", "", ""),
]


@pytest.mark.parametrize(("raw", "prompt", "expected"), CASES)
def test_clean_vlm_output_table(raw: str, prompt: str, expected: str) -> None:
    assert clean_vlm_output(raw, CTX, prompt=prompt) == expected


_RULES = [
    "_SPECIAL_TOKEN",
    "_USER_TURN",
    "_ROLE",
    *(f"_BOILERPLATE[{i}]" for i in range(len(vlm_text._BOILERPLATE))),
]


@pytest.mark.parametrize("rule", _RULES)
def test_every_stripping_rule_is_needed_by_the_table(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table covers the cleaner: with any one rule switched off (a pattern that
    never matches), at least one case comes out wrong."""
    never = re.compile(r"(?!)")
    if rule.startswith("_BOILERPLATE"):
        patterns = list(vlm_text._BOILERPLATE)
        patterns[int(rule[len("_BOILERPLATE[") : -1])] = never
        monkeypatch.setattr(vlm_text, "_BOILERPLATE", patterns)
    else:
        monkeypatch.setattr(vlm_text, rule, never)
    wrong = [
        raw for raw, prompt, want in CASES if clean_vlm_output(raw, CTX, prompt=prompt) != want
    ]
    assert wrong, f"no case in CASES needs {rule}"


def test_the_prompt_echo_is_needed_by_the_table() -> None:
    """Without the prompt, the cases that echo it come out wrong."""
    echoed = [(raw, want) for raw, prompt, want in CASES if prompt]
    assert echoed
    assert any(clean_vlm_output(raw, CTX) != want for raw, want in echoed)


# The plan's clean_vlm_output (seeds/000) removes these openings, case-insensitively.
SEED_PREFIXES = [
    "The person is ",
    "This person is ",
    "The image shows ",
    "In the image, ",
    "Description: ",
    "A: ",
    "Answer: ",
]


@pytest.mark.parametrize("prefix", SEED_PREFIXES)
@pytest.mark.parametrize("case", [str, str.lower, str.upper])
def test_every_seed_prefix_is_stripped(prefix: str, case) -> None:
    raw = case(prefix) + "a tall man in a grey coat, smiling"
    assert clean_vlm_output(raw, CTX) == "A tall man in a grey coat, smiling."


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The person is wearing a red dress.", "Wearing a red dress."),
        ("The person in the photo is sitting on a bench", "Sitting on a bench."),
        ("Q: Describe this person. A: a woman with short hair", "A woman with short hair."),
        ("A: The person is standing", "Standing."),  # stacked: both go
        ("The person is", "The person is."),  # never empty
        ("The personal computer is old.", "The personal computer is old."),
        ("A:B testing of two layouts", "A:B testing of two layouts."),  # no space: kept
        ("A person is walking a dog.", "A person is walking a dog."),
    ],
)
def test_person_and_answer_prefixes(raw: str, expected: str) -> None:
    assert clean_vlm_output(raw, CTX) == expected


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 15


def test_clean_truncates_at_sentence_boundary() -> None:
    raw = (
        "The image shows a woman in a red dress. She stands beside a tall window. "
        "Sunlight falls across the wooden floor of the room."
    )
    assert clean_vlm_output(raw, CTX, max_words=14) == (
        "A woman in a red dress. She stands beside a tall window."
    )
    assert clean_vlm_output(raw, CTX, max_words=5) == "A woman in a red."  # word cut
    assert clean_vlm_output(raw, CTX).endswith("room.")  # 0 = unlimited


def test_clean_reads_max_words_and_prompt_from_context() -> None:
    @dataclass(frozen=True)
    class Ctx:
        caption_type: str = "caption"
        max_words: int = 4
        prompt: str = "What is this?"

    assert clean_vlm_output("What is this? a big old house. Nice.", Ctx()) == "A big old house."


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("One two three. Four five six.", 0, "One two three. Four five six."),
        ("One two three. Four five six.", 6, "One two three. Four five six."),
        ("One two three. Four five six.", 5, "One two three."),
        ("One two three. Four five six.", 3, "One two three."),
        ("One two three four five six", 4, "One two three four."),
        ("One two, three four", 2, "One two."),
        ("It is 3.5 metres tall. Then more words here.", 5, "It is 3.5 metres tall."),
        ('He said "stop." Then he left quickly.', 3, 'He said "stop."'),
        ("Wow! Such a dog. Very nice.", 4, "Wow! Such a dog."),
    ],
)
def test_truncate_words(text: str, n: int, expected: str) -> None:
    out = truncate_words(text, n)
    assert out == expected
    if n:
        assert len(out.split()) <= n


def test_split_sentences_keeps_decimals_and_quotes() -> None:
    assert split_sentences('A 2.5 m wall. "Yes." And a tail') == [
        "A 2.5 m wall.",
        '"Yes."',
        "And a tail",
    ]


def test_tag_lists_pass_through_unchanged() -> None:
    tags = PostContext(caption_type="tags")
    assert clean_vlm_output("the image shows, 1girl, solo", tags) == "the image shows, 1girl, solo"


def test_registered_as_postprocess_step() -> None:
    assert postprocess.STEPS["clean_vlm_output"] is clean_vlm_output
    pipe = postprocess.Pipeline(["clean_vlm_output", "terminal_punctuation"])
    assert pipe("The image shows a cat", CTX) == "A cat."
