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
