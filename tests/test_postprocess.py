import re

import pytest

from daemon.text.postprocess import Pipeline, PostContext, pipeline_for

TAGS = PostContext(caption_type="tags")
PROSE = PostContext(caption_type="caption")
DEFAULT = [
    "replace_underscores",
    "collapse_spaces",
    "punctuation_spacing",
    "trim",
    "terminal_punctuation",
    "trigger_word",
]


@pytest.mark.parametrize(
    ("raw", "ctx", "expected"),
    [
        ("long_hair, ^_^, blue_eyes", TAGS, "long hair, ^_^, blue eyes"),
        ("  1girl ,  solo,, smile , ", TAGS, "1girl, solo, smile"),
        ("a  woman   standing ,in a field", PROSE, "a woman standing, in a field."),
        ("It costs 1,000 yen at 10:30", PROSE, "It costs 1,000 yen at 10:30."),
        ("A cat on a mat!", PROSE, "A cat on a mat!"),
        ("x_x and o_o faces_here", PROSE, "x_x and o_o faces here."),
    ],
)
def test_default_pipeline(raw, ctx, expected):
    assert Pipeline(DEFAULT)(raw, ctx) == expected


def test_trigger_word_tags_first_once():
    ctx = PostContext(caption_type="tags", trigger_word="sks")
    assert Pipeline(["trigger_word"])("1girl, sks, smile", ctx) == "sks, 1girl, smile"


def test_trigger_word_prose_not_doubled():
    ctx = PostContext(caption_type="caption", trigger_word="sks")
    p = Pipeline(["trigger_word"])
    assert p("a man.", ctx) == "sks, a man."
    assert p("sks, a man.", ctx) == "sks, a man."


def test_case_step():
    p = Pipeline(["case"])
    assert p("a Dog", PostContext(caption_type="caption", case="sentence")) == "A Dog"
    assert p("a Dog", PostContext(caption_type="caption", case="lower")) == "a dog"
    assert p("a Dog", PostContext(caption_type="caption", case="keep")) == "a Dog"


def test_order_matters_and_overrides():
    ctx = PostContext(caption_type="caption", trigger_word="sks")
    # terminal punctuation after the trigger adds the period at the very end
    assert Pipeline(["trigger_word", "terminal_punctuation"])("", ctx) == "sks."
    assert pipeline_for(DEFAULT, {"echo": ["trim"]}, "echo").names == ("trim",)
    assert pipeline_for(DEFAULT, {"echo": ["trim"]}, "other").names == tuple(DEFAULT)


def test_custom_separator():
    ctx = PostContext(caption_type="tags", separator=" | ")
    assert Pipeline(["replace_underscores", "dedupe_tags"])("a_b | c | a_b", ctx) == "a b | c"


def test_prose_keeps_line_breaks():
    text = "sksA:  a woman  in red. \n\n  sksB: a man.\nScene: a   park"
    out = Pipeline(DEFAULT)(text, PROSE)
    assert out == "sksA: a woman in red.\nsksB: a man.\nScene: a park."


def test_unknown_step():
    with pytest.raises(ValueError, match="unknown post-processing steps"):
        Pipeline(["nope"])


def test_escaped_kaomoji_keep_underscores():
    assert Pipeline(["replace_underscores"])(r"\(o\)_\(o\), x_y", TAGS) == r"\(o\)_\(o\), x y"


def test_generator_keeping_underscores_is_respected():
    ctx = PostContext(caption_type="tags", underscores_to_spaces=False)
    assert Pipeline(["replace_underscores"])("long_hair, x_x", ctx) == "long_hair, x_x"


# -- the Reynard document's shape (seeds/001) -------------------------------------------

import random  # noqa: E402

from daemon.config import PostProcessConfig  # noqa: E402
from daemon.text.postprocess import (  # noqa: E402
    REYNARD_RULES,
    STEPS,
    from_reynard,
    settings_shape,
    to_reynard,
)

# The document's own example (seeds/001, "Post-processing Options").
SEED_DOCUMENT = {
    "enabled": True,
    "rules": {
        "replace_underscores": True,
        "case_conversion": "none",
        "trim_whitespace": True,
        "remove_duplicate_spaces": True,
        "normalize_punctuation_spacing": True,
        "ensure_terminal_punctuation": True,
    },
    "pipeline": [
        "replace_underscores",
        "trim_whitespace",
        "remove_duplicate_spaces",
        "normalize_punctuation_spacing",
        "case_conversion",
        "ensure_terminal_punctuation",
    ],
    "overrides": {
        "jtp2": {"replace_underscores": True},
        "joy": {"replace_underscores": False},
    },
}

SAMPLES = [
    ("long_hair ,  ^_^, 1girl, 1girl ,blue_eyes,", TAGS),
    ("  The image shows a_woman  standing ,in a field  ", PROSE),
    ("USER: hi ASSISTANT: A red car", PROSE),
    ("x_x and MIXED Case words here!", PROSE),
]


def run(settings: dict, generator: str, text: str, ctx: PostContext) -> str:
    cfg = PostProcessConfig.model_validate(settings)
    c = PostContext(
        caption_type=ctx.caption_type,
        trigger_word="sks",
        case=cfg.case,
        max_words=cfg.max_words,
        prompt="hi",
    )
    return pipeline_for(cfg.steps, cfg.overrides, generator)(text, c)


def behaves_the_same(a: dict, b: dict, generators: list[str]) -> bool:
    return all(
        run(a, g, text, ctx) == run(b, g, text, ctx)
        for g in [*generators, "some_other_generator"]
        for text, ctx in SAMPLES
    )


def test_default_settings_in_the_reynard_shape() -> None:
    doc = to_reynard(PostProcessConfig())
    assert doc == {
        "enabled": True,
        "rules": {
            "replace_underscores": True,
            "trim_whitespace": True,
            "remove_duplicate_spaces": True,
            "normalize_punctuation_spacing": True,
            "case_conversion": "none",
            "ensure_terminal_punctuation": True,
            "clean_vlm_output": False,
            "dedupe_tags": False,
            "trigger_word": True,
        },
        "pipeline": [
            "replace_underscores",
            "remove_duplicate_spaces",
            "normalize_punctuation_spacing",
            "trim_whitespace",
            "ensure_terminal_punctuation",
            "trigger_word",
            "case_conversion",
            "clean_vlm_output",
            "dedupe_tags",
        ],
        "overrides": {},
        "max_words": 0,
    }
    assert from_reynard(doc) == PostProcessConfig().model_dump()


def test_the_seed_document_in_captiond_settings() -> None:
    got = from_reynard(SEED_DOCUMENT)
    base = ["replace_underscores", "trim", "collapse_spaces", "punctuation_spacing"]
    assert got == {
        "steps": [*base, "terminal_punctuation"],
        "case": "keep",
        "max_words": 0,
        "overrides": {
            "jtp2": [*base, "terminal_punctuation"],
            "joy": [*base[1:], "terminal_punctuation"],
        },
    }
    PostProcessConfig.model_validate(got)  # valid settings
    # and back: the same rules, pipeline and override meanings
    doc = to_reynard(got)
    assert {k: doc["rules"][k] for k in SEED_DOCUMENT["rules"]} == SEED_DOCUMENT["rules"]
    assert not any(doc["rules"][k] for k in ("clean_vlm_output", "dedupe_tags", "trigger_word"))
    assert doc["pipeline"][:4] == SEED_DOCUMENT["pipeline"][:4]
    # overrides are written in full: captiond's are whole chains
    assert doc["overrides"]["jtp2"] == doc["rules"]
    assert doc["overrides"]["joy"] == doc["rules"] | {"replace_underscores": False}
    assert from_reynard(doc) == got


ROUND_TRIPS = [
    PostProcessConfig().model_dump(),
    {
        "steps": ["clean_vlm_output", "trim", "case", "terminal_punctuation", "trigger_word"],
        "case": "sentence",
        "max_words": 35,
        "overrides": {
            "wd_tagger": ["replace_underscores", "dedupe_tags", "trigger_word"],
            "vlm": ["trigger_word", "clean_vlm_output"],  # another order
            "multi_person": [],
        },
    },
    {"steps": [], "case": "keep", "max_words": 0, "overrides": {}},
    {"steps": [], "case": "lower", "max_words": 3, "overrides": {"vlm": ["case", "trim"]}},
    {"steps": ["trim", "dedupe_tags", "trim"], "case": "keep", "max_words": 0, "overrides": {}},
    {
        "steps": ["dedupe_tags", "trigger_word", "clean_vlm_output"],
        "case": "keep",
        "max_words": 0,
        "overrides": {"a": ["trigger_word"], "b": ["clean_vlm_output", "clean_vlm_output"]},
    },
]


@pytest.mark.parametrize("settings", ROUND_TRIPS)
def test_captiond_settings_survive_a_round_trip(settings: dict) -> None:
    doc = to_reynard(settings)
    assert from_reynard(doc) == settings
    assert to_reynard(from_reynard(doc)) == doc  # and the document survives its own


def test_captiond_only_steps_survive_a_round_trip() -> None:
    own = ["trigger_word", "clean_vlm_output", "dedupe_tags"]
    settings = {"steps": own, "case": "keep", "max_words": 0, "overrides": {"vlm": own[::-1]}}
    doc = to_reynard(settings)
    assert all(doc["rules"][s] is True for s in own)
    assert doc["pipeline"][:3] == own
    back = from_reynard(doc)
    assert back["steps"] == own and back["overrides"]["vlm"] == own[::-1]


def test_random_settings_round_trip_to_the_same_behaviour() -> None:
    rng = random.Random(10)
    names = sorted(STEPS)
    for _ in range(300):

        def chain() -> list[str]:
            return [rng.choice(names) for _ in range(rng.randint(0, 7))]

        settings = {
            "steps": chain(),
            "case": rng.choice(["keep", "lower", "sentence"]),
            "max_words": rng.choice([0, 3, 12]),
            "overrides": {g: chain() for g in rng.sample(["wd_tagger", "vlm", "x"], 2)},
        }
        doc = to_reynard(settings)
        back = from_reynard(doc)
        assert behaves_the_same(settings, back, list(settings["overrides"])), settings
        assert from_reynard(to_reynard(back)) == back  # normal form: stable
        assert to_reynard(back) == doc


def test_reynard_documents_survive_a_round_trip_through_captiond() -> None:
    """Random documents -> captiond -> document -> captiond: the same chains."""
    rng = random.Random(11)
    rules = list(REYNARD_RULES)
    for _ in range(200):
        case = rng.choice(["none", "lower"])

        def flags() -> dict:
            out = {r: rng.random() < 0.5 for r in rng.sample(rules, rng.randint(0, 6))}
            out.pop("case_conversion", None)
            return out

        doc = {
            "enabled": True,
            "rules": flags() | {"case_conversion": case},
            "pipeline": rng.sample(rules, rng.randint(0, len(rules))),
            "overrides": {g: flags() for g in ("jtp2", "joy")},
        }
        once = from_reynard(doc)
        assert from_reynard(to_reynard(once)) == once


def test_disabled_document_means_no_post_processing() -> None:
    got = from_reynard(SEED_DOCUMENT | {"enabled": False})
    assert got["steps"] == [] and got["overrides"] == {"jtp2": [], "joy": []}
    assert to_reynard(got)["enabled"] is False
    assert run(got, "joy", "a_b ,c", PROSE) == "a_b ,c"


def test_case_conversion_maps_to_the_case_step() -> None:
    doc = {"rules": {"case_conversion": "lower", "trim_whitespace": True}}
    got = from_reynard(doc)
    assert got["case"] == "lower" and got["steps"] == ["trim", "case"]
    assert run(got, "vlm", "  A Big CAT ", PROSE) == "a big cat"
    override = from_reynard({"rules": {}, "overrides": {"vlm": {"case_conversion": "sentence"}}})
    assert override["case"] == "sentence" and override["overrides"]["vlm"] == ["case"]


def test_partial_document_over_the_current_settings() -> None:
    current = ROUND_TRIPS[1]
    got = from_reynard({"rules": {"dedupe_tags": True}, "max_words": 10}, base=current)
    assert got["steps"] == [*current["steps"], "dedupe_tags"]
    # a generator with its own chain keeps it: the base's overrides are whole chains
    assert got["max_words"] == 10 and got["overrides"] == current["overrides"]
    assert got["case"] == "sentence"
    # settings with no steps at all are not a switch that stays off
    empty = {"steps": [], "case": "keep", "max_words": 0, "overrides": {}}
    assert to_reynard(empty)["enabled"] is False
    assert from_reynard({"rules": {"trim_whitespace": True}}, base=empty)["steps"] == ["trim"]
    # a document's own partial override follows the global rules it does not name
    partial = from_reynard({"rules": {"trim_whitespace": True}, "overrides": {"v": {}}})
    assert partial["overrides"] == {"v": ["trim"]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"rules": {"make_it_pretty": True}}, "unknown rule 'make_it_pretty'"),
        ({"rules": {"case_conversion": "upper"}}, "case_conversion: 'upper'"),
        ({"rules": {"trim_whitespace": "yes"}}, "rules.trim_whitespace must be true or false"),
        ({"pipeline": ["trim_whitespace", "sparkle"]}, "unknown rules ['sparkle']"),
        ({"pipeline": "trim_whitespace"}, "pipeline must be a list"),
        ({"overrides": {"joy": ["trim"]}}, "overrides.joy must be an object"),
        ({"overrides": {"joy": {"shout": True}}}, "overrides.joy: unknown rule 'shout'"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"max_words": -1}, "max_words"),
        ({"steps": []}, "unknown keys ['steps']"),
        (
            {
                "rules": {"case_conversion": "lower"},
                "overrides": {"joy": {"case_conversion": "sentence"}},
            },
            "one case conversion",
        ),
    ],
)
def test_invalid_documents_are_refused_with_the_key(doc: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        from_reynard(doc)


def test_unknown_captiond_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown post-processing steps"):
        to_reynard({"steps": ["nope"], "overrides": {}})


def test_settings_shape_tells_the_two_apart() -> None:
    assert settings_shape(SEED_DOCUMENT) == "reynard"
    assert settings_shape(PostProcessConfig().model_dump()) == "captiond"
    assert settings_shape({"overrides": {"vlm": ["trim"]}}) == "captiond"
    assert settings_shape({"overrides": {"vlm": {"trim_whitespace": True}}}) == "reynard"
    with pytest.raises(ValueError, match="mix"):
        settings_shape({"steps": [], "rules": {}})


def test_conversions_are_pure() -> None:
    settings = ROUND_TRIPS[1]
    frozen = repr(settings), repr(SEED_DOCUMENT)
    to_reynard(settings)
    from_reynard(SEED_DOCUMENT, base=settings)
    assert (repr(settings), repr(SEED_DOCUMENT)) == frozen


def test_terminal_punctuation_looks_at_the_end_only() -> None:
    step = Pipeline(["terminal_punctuation"])
    assert step("a red car  ", PROSE) == "a red car."
    assert step("  a red car", PROSE) == "  a red car."
    assert step("a photo of model X", PROSE) == "a photo of model X."
    assert step('she said "hi"', PROSE) == 'she said "hi"'
    assert step("1girl, solo,  ", TAGS) == "1girl, solo"
    assert step("1girl, solo,,", TAGS) == "1girl, solo"
    assert step(" 1girl, solo", TAGS) == " 1girl, solo"
    spaced = PostContext(caption_type="tags", separator=" ")
    assert step("1girl solo,", spaced) == "1girl solo"
    assert step("1girl solo X", spaced) == "1girl solo X"  # only the separator goes


def test_a_whitespace_separator_still_splits_a_tag_list_on_commas() -> None:
    ctx = PostContext(caption_type="tags", separator=" ", trigger_word="sks")
    assert Pipeline(["trigger_word"])("solo, sks, smile", ctx) == "sks solo smile"


def test_settings_given_in_part_are_completed_with_the_defaults() -> None:
    doc = to_reynard({"steps": ["trim"]})
    assert doc["max_words"] == 0 and doc["overrides"] == {}
    assert doc["rules"]["case_conversion"] == "none" and doc["rules"]["trim_whitespace"]
    assert from_reynard(doc) == {"steps": ["trim"], "case": "keep", "max_words": 0, "overrides": {}}
    assert to_reynard({})["enabled"] is False


def test_a_partial_document_keeps_the_current_word_limit() -> None:
    current = {"steps": ["trim"], "case": "keep", "max_words": 40, "overrides": {}}
    assert from_reynard({"rules": {"dedupe_tags": True}}, base=current)["max_words"] == 40
    assert from_reynard({"max_words": 0}, base=current)["max_words"] == 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"max_words": True}, "max_words must be a whole number >= 0"),
        ({"max_words": "5"}, "max_words must be a whole number >= 0"),
        ({"max_words": 2.5}, "max_words must be a whole number >= 0"),
        ({"rules": {"pipeline": ["trim_whitespace"]}}, "unknown rule 'pipeline'"),
        ({"overrides": ["joy"]}, "overrides must be an object: generator -> rules"),
        (
            {"overrides": {"joy": {"pipeline": ["sparkle"]}}},
            "overrides.joy.pipeline: unknown rules ['sparkle']",
        ),
    ],
)
def test_more_invalid_documents_say_what_is_wrong(doc: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        from_reynard(doc)


def test_a_document_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match="the post-processing document must be an object"):
        from_reynard(["rules"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"case 'shout' is not one of \['keep', 'lower'"):
        to_reynard({"steps": [], "case": "shout"})
    with pytest.raises(ValueError, match=r"\['steps'\] \(captiond\); use one"):
        settings_shape({"steps": [], "rules": {}})


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (["rules"], "the post-processing document must be an object"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"overrides": ["joy"]}, "overrides must be an object: generator -> rules"),
        ({"max_words": -1}, "max_words must be a whole number >= 0"),
    ],
)
def test_a_refusal_is_the_sentence_the_api_answers_with(doc, message: str) -> None:
    with pytest.raises(ValueError) as info:
        from_reynard(doc)
    assert str(info.value) == message
