"""Caption checks (issue 14): each kind of contradiction is flagged with the right
reason; a set of consistent caption pairs stays at zero flags; flags live in the index
with their reason, keep a dismissal while the image is the same and come back when it
changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.queue import CaptionRecord, Database, FileIndex
from daemon.report.checks import (
    Checker,
    Context,
    Source,
    check_images,
    check_readings,
    guess_source,
    read_caption,
    source_of,
)

WD = Source("wd_tagger", "tags")
VLM = Source("vlm", "prose", prompts=("Describe this image in one detailed paragraph.",))
MP_LINES = Source("mp", "prose", people="lines", scene="Scene")
MP_TAGS = Source("mpt", "tags", people="markers", marker_template="person{n}", scene="scene")
CTX = Context(trigger="", language="en")


def findings(tags: str | None, prose: str | None, *, extra: list[tuple[Source, str]] = (),
             ctx: Context = CTX) -> dict[tuple[str, str], str]:  # fmt: skip
    readings = []
    if tags is not None:
        readings.append(read_caption(WD, tags, "h", ctx))
    if prose is not None:
        readings.append(read_caption(VLM, prose, "h", ctx))
    for src, text in extra:
        readings.append(read_caption(src, text, "h", ctx))
    prompts = {VLM.name: VLM.prompts}
    return {(f.generator, f.check): f.reason for f in check_readings(readings, ctx, prompts)}


# -- contradictions: (tags, prose, check, words the reason must contain) -----------------
CONTRADICTIONS = [
    # gender
    ("1girl, solo, long hair", "A man with long hair stands by a window.", "gender",
     ["'man'", "male", "'1girl'"]),
    ("1boy, solo, short hair", "A young woman smiles; she holds her cup.", "gender",
     ["'woman'", "'she'", "'1boy'"]),
    ("2girls, multiple girls", "Two boys play football on a field.", "gender",
     ["'boys'", "2girls"]),
    # number of people
    ("1girl, solo", "Two women sit on a bench and talk.", "people_count",
     ["two women", "at least 2 people", "solo", "1 person"]),
    ("2girls, multiple girls", "A girl sits by herself on a bench.", "people_count",
     ["by herself", "1 person", "2girls"]),
    ("1girl, 1boy", "A group of people dance at a party.", "people_count",
     ["a group of people", "at least 3", "2 people"]),
    # no_humans
    ("no humans, scenery, tree", "A woman walks along a path between the trees.", "no_humans",
     ["'woman'", "'no humans'"]),
    ("1girl, solo, smile", "An empty street at night; no people are around.", "no_humans",
     ["'no people'", "'1girl'"]),
    # hair colour
    ("1girl, solo, blonde hair, long hair", "A woman with long black hair in a park.",
     "hair_colour", ["'black hair'", "'blonde hair'"]),
    ("1girl, solo, red hair", "A brunette woman reads a book.", "hair_colour",
     ["'brunette'", "'red hair'"]),
    # eye colour
    ("1girl, solo, blue eyes", "A girl with big green eyes looks at the viewer.", "eye_colour",
     ["'green eyes'", "'blue eyes'"]),
    # indoors / outdoors
    ("1girl, solo, indoors, bed", "A girl sits on a bench in the park.", "indoor_outdoor",
     ["'in the park'", "(outdoors)", "'indoors'"]),
    ("1girl, solo, outdoors, sky", "A girl reads on the couch in the living room.",
     "indoor_outdoor", ["'living room'", "'outdoors'"]),
]  # fmt: skip


@pytest.mark.parametrize(("tags", "prose", "check", "words"), CONTRADICTIONS)
def test_contradictions_are_flagged_with_their_reason(
    tags: str, prose: str, check: str, words: list[str]
) -> None:
    found = findings(tags, prose)
    assert ("vlm", check) in found, found
    reason = found[("vlm", check)]
    for w in words:
        assert w in reason, reason


def test_sks_lines_against_the_tags() -> None:
    lines = "sksA: A woman in a red coat.\nsksB: A woman in a blue coat.\nScene: A busy street."
    found = findings("1girl, solo", None, extra=[(MP_LINES, lines)])
    assert ("mp", "people_count") in found
    assert "2 people ('sksA', 'sksB')" in found[("mp", "people_count")]
    assert "solo" in found[("mp", "people_count")]
    # the same lines with tags that say two people: nothing
    assert ("mp", "people_count") not in findings("2girls", None, extra=[(MP_LINES, lines)])


def test_prose_against_the_people_detected() -> None:
    lines = "sksA: A man in a grey suit.\nScene: An office with a desk."
    found = findings(None, "Three men stand around a table.", extra=[(MP_LINES, lines)])
    assert "mp detected 1 person" in found[("vlm", "people_count")]
    assert "three men" in found[("vlm", "people_count")]


def test_person_markers_against_the_tags() -> None:
    marked = "person1, 1girl, solo, red dress, person2, 1boy, solo, suit, scene, park"
    found = findings("1girl, solo, red dress, park", None, extra=[(MP_TAGS, marked)])
    assert "2 people detected" in found[("mpt", "people_count")]
    # its per-crop "solo" tags are not the image's tags: prose about two people is fine
    assert findings("1girl, 1boy, park", "A woman and a man walk in the park.",
                    extra=[(MP_TAGS, marked)]) == {}  # fmt: skip


def test_prose_problems_on_their_own() -> None:
    f = findings(None, "Describe this image. A cat sleeps on a sofa.")
    assert "echoed" in f[("vlm", "prompt_echo")]
    f = findings(None, "Describe this image in one detailed paragraph: a cat on a sofa.")
    assert "prompt_echo" in {c for _g, c in f}
    f = findings(None, "USER: what is it? ASSISTANT: A cat.")
    assert ("vlm", "prompt_echo") in f
    f = findings(None, "I'm sorry, I can't help with identifying people in images.")
    assert ("vlm", "refusal") in f
    loop = "A cat on a sofa, a cat on a sofa, a cat on a sofa, a cat on a sofa."
    assert "repeated 4 times" in findings(None, loop)[("vlm", "repetition")]
    assert (
        "times in a row" in findings(None, "A very very very very red car.")[("vlm", "repetition")]
    )
    cut = findings(None, "A woman in a long dress stands in front of the.")
    assert "'...in front of the.'" in cut[("vlm", "cut_sentence")]
    assert ("vlm", "cut_sentence") in findings(None, "A woman in a long dress stands in")
    assert ("vlm", "cut_sentence") in findings(None, "A woman with a red hat and,.")
    de = findings(None, "Eine Frau mit langen schwarzen Haaren steht in einem Park.")
    assert "'de'" in de[("vlm", "language")]
    ru = findings(None, "Женщина с длинными волосами стоит в парке.")
    assert "Cyrillic" in ru[("vlm", "language")]
    ctx = Context(trigger="sks", language="en")
    assert "only 'sks'" in findings(None, "sks.", ctx=ctx)[("vlm", "empty")]
    assert ("wd_tagger", "empty") in findings("sks", None, ctx=ctx)


def test_the_configured_language_is_the_yardstick() -> None:
    de = "Eine Frau mit langen schwarzen Haaren steht in einem Park."
    assert findings(None, de, ctx=Context(language="de")) == {}
    en = "A woman with long black hair stands in a park with her dog."
    assert ("vlm", "language") in findings(None, en, ctx=Context(language="de"))


def test_the_trigger_word_is_no_evidence() -> None:
    """A trigger like "ohwx man" must not count as a man in the prose."""
    ctx = Context(trigger="ohwx man")
    assert findings("1girl, solo", "ohwx man, a woman reading by a window.", ctx=ctx) == {}


# -- consistent pairs: zero flags --------------------------------------------------------
CONSISTENT = [
    ("1girl, solo, long hair, blonde hair, blue eyes, dress, outdoors, day, sky, tree",
     "A young woman with long blonde hair and blue eyes stands under a tree on a sunny day, "
     "wearing a white summer dress."),
    ("1boy, solo, short hair, black hair, brown eyes, suit, necktie, indoors, office",
     "A man with short black hair and brown eyes, wearing a dark suit and a tie, sits at his "
     "desk in an office."),
    ("1girl, 1boy, holding hands, outdoors, park, bench",
     "A woman and a man hold hands while sitting on a bench in the park."),
    ("1girl, 1boy, indoors, kitchen, cooking",
     "A mother cooks with her son in the kitchen; he stirs the pot while she watches."),
    ("no humans, scenery, mountain, lake, sky, cloud, outdoors",
     "A calm lake reflects snowy mountains under a cloudy sky. No people are visible."),
    ("no humans, indoors, bedroom, bed, window",
     "An empty bedroom with a made bed and sunlight coming through the window."),
    ("no humans, statue, outdoors, park",
     "A bronze statue of a man on horseback stands in the park."),
    ("no humans, indoors, painting (object), wall",
     "A painting of a woman in a red dress hangs on a white wall."),
    ("2girls, multiple girls, school uniform, indoors, classroom",
     "Two schoolgirls in uniforms talk at their desks in a classroom."),
    ("3girls, multiple girls, beach, outdoors, swimsuit",
     "Three women in swimsuits laugh together on the beach."),
    ("multiple boys, 6+boys, crowd, stadium, outdoors",
     "A crowd of men cheers in a stadium; many people wave flags."),
    ("1girl, solo, red hair, green eyes, freckles, portrait",
     "A close-up portrait of a redhead with green eyes and freckles."),
    ("1girl, solo, multicolored hair, pink hair, blue hair",
     "A girl with pink and blue hair smiles."),
    ("1girl, solo, heterochromia, blue eyes, yellow eyes",
     "A girl with one red eye and one green eye looks at the viewer."),
    ("1girl, solo, brown hair, brown eyes, sweater, indoors, cafe",
     "A brunette woman with dark brown eyes drinks coffee in a cafe."),
    ("1girl, solo, white hair, red eyes, kimono, outdoors, snow",
     "A girl with silver hair and crimson eyes wears a kimono in the snow."),
    ("1girl, solo, black hair, dark eyes, night, outdoors, street",
     "A woman with jet-black hair and dark eyes walks down the street at night."),
    ("1boy, solo, blonde hair, blue eyes, armor, sword",
     "A blond knight in silver armor raises his sword."),
    ("1girl, solo, smile, looking at viewer, upper body",
     "A smiling girl looks directly at the viewer."),
    ("cat, no humans, animal focus, indoors, sofa",
     "A ginger cat sleeps curled up on a sofa."),
    ("1girl, solo, reading, book, library, indoors",
     "A woman reads a thick book in a quiet library, surrounded by shelves."),
    ("1girl, solo, dress, poster (object), indoors",
     "A girl in a dress stands beside a poster of a man on the wall."),
    ("1boy, solo, beard, glasses, indoors",
     "A bearded man with glasses sits in a room filled with plants."),
    ("1girl, 2boys, multiple boys, outdoors, street",
     "A woman walks down the street with two men."),
    ("1girl, solo, long hair, brown hair, outdoors, field, flower",
     "A woman with long, wavy brown hair stands in a field of flowers, her dress moving in "
     "the wind."),
    ("1girl, solo, blue hair, twintails, idol, stage",
     "An anime girl with teal twintails sings on a stage."),
    ("2boys, multiple boys, basketball, outdoors",
     "Both boys jump for the ball on an outdoor court."),
    ("1girl, solo, maid, indoors",
     "A maid in a black and white uniform bows politely."),
    ("1boy, solo, child, outdoors, beach",
     "A little boy builds a sandcastle on the beach."),
    ("1girl, solo, sitting, chair, indoors",
     "A woman sits on a wooden chair, her hands resting in her lap."),
    ("1girl, solo, long hair, purple hair, purple eyes",
     "A girl with long violet hair and lavender eyes."),
    ("1girl, solo, grey hair, old woman, indoors",
     "An elderly woman with gray hair knits by the fireplace in the living room."),
    ("1girl, solo, outdoors, rain, umbrella",
     "A woman with an umbrella walks in the rain."),
    ("1girl, solo, headphones, indoors, bedroom",
     "A girl listens to music with headphones on her bed in the bedroom."),
    ("1other, solo, robot, outdoors",
     "A small robot explores a rocky landscape."),
    ("1girl, solo, pink hair, green eyes",
     "Anime-style illustration of a girl with pink hair and emerald eyes."),
    ("1boy, solo, orange hair, outdoors, sunset",
     "A ginger-haired boy watches the sunset from a hill."),
    ("no humans, food, cake, indoors",
     "A chocolate cake with strawberries on a plate."),
    ("1girl, solo, standing, full body, white background",
     "A full-body view of a woman standing against a plain white background."),
    ("1girl, solo, car, outdoors, road",
     "A woman leans against a red car parked by the road."),
]  # fmt: skip


def test_consistent_pairs_raise_no_flag() -> None:
    flagged = {}
    for tags, prose in CONSISTENT:
        found = findings(tags, prose)
        if found:
            flagged[prose] = found
    assert flagged == {}
    assert len(CONSISTENT) >= 40


def test_consistent_multi_person_captions_raise_no_flag() -> None:
    lines = (
        "sksA: A woman with long blonde hair in a blue dress, smiling.\n"
        "sksB: A man with short brown hair in a grey suit.\n"
        "Scene: A park with tall trees and a fountain."
    )
    tags = "1girl, 1boy, blonde hair, brown hair, dress, suit, outdoors, park, tree"
    prose = "A woman in a blue dress and a man in a grey suit stand by a fountain in the park."
    assert findings(tags, prose, extra=[(MP_LINES, lines)]) == {}


# -- sources -----------------------------------------------------------------------------


def test_unknown_generators_are_read_by_their_text() -> None:
    assert guess_source("x", "1girl, solo, long hair").kind == "tags"
    assert guess_source("x", "A woman stands in a park. She smiles.").kind == "prose"
    assert guess_source("x", "sks, A man reads.").kind == "prose"
    assert guess_source("x", "sks, 1girl, ^_^, :d").kind == "tags"
    lines = guess_source("x", "sksA: a woman.\nScene: a park.")
    assert (lines.kind, lines.people) == ("prose", "lines")
    assert guess_source("x", "person1, 1girl, person2, 1boy").people == "markers"


def test_source_of_a_generator_object() -> None:
    class Cfg:
        mode = "fine_tune_caption"
        aliases = ("alice",)
        scene_label = "Scene"
        person_prompt = "Describe the person."

    class Gen:
        caption_type = "caption"
        config = Cfg()

    src = source_of("alice_and_bob", Gen())
    assert (src.kind, src.people, src.markers, src.scene) == ("prose", "lines", ("alice",), "Scene")
    assert "Describe the person." in src.prompts


# -- flags in the index ------------------------------------------------------------------


@pytest.fixture
def index(tmp_path: Path) -> FileIndex:
    db = Database(tmp_path / "q.db")
    now = [100.0]
    idx = FileIndex(db, clock=lambda: now[0])
    idx.now = now  # type: ignore[attr-defined]
    yield idx
    db.close()


def _write(index: FileIndex, path: str, gen: str, digest: str, text: str) -> None:
    index.record_captions([CaptionRecord(path, gen, digest, path + "." + gen, "s-" + text, 0.0,
                                         text=text)])  # fmt: skip


def _checker() -> Checker:
    return Checker({"wd_tagger": WD, "vlm": VLM}, lambda path: CTX)


def test_flags_are_kept_dismissed_and_reopened_when_the_image_changes(index: FileIndex) -> None:
    p = "/r/a.png"
    _write(index, p, "wd_tagger", "h1", "1girl, solo")
    _write(index, p, "vlm", "h1", "A man reads a book.")
    assert check_images(index, _checker(), [p]) == 1
    (flag,) = index.flags_under("/r")
    assert flag[:3] == (p, "vlm", "gender") and flag[4] == "h1" and flag[6] is None
    assert "'man'" in flag[3]
    assert index.flag_counts() == {"gender": (1, 0)}

    assert index.dismiss_flags(p, "vlm", "gender") == 1
    assert index.flag_counts() == {"gender": (0, 1)}
    # the same content checked again (a new caption of it): the dismissal holds
    _write(index, p, "vlm", "h1", "A man with glasses reads a book.")
    assert check_images(index, _checker(), [p]) == 0
    assert index.flag_counts() == {"gender": (0, 1)}
    # the image changed: a new content is looked at afresh
    index.now[0] = 200.0  # type: ignore[attr-defined]
    _write(index, p, "wd_tagger", "h2", "1girl, solo")
    _write(index, p, "vlm", "h2", "A man reads a newspaper.")
    assert check_images(index, _checker(), [p]) == 1
    (flag,) = index.flags_under("/r")
    assert flag[4] == "h2" and flag[5] == 200.0 and flag[6] is None
    # fixed: the flag goes
    _write(index, p, "vlm", "h2", "A woman reads a newspaper.")
    check_images(index, _checker(), [p])
    assert index.flags_under("/r") == []


def test_stale_images_are_found_by_their_key(index: FileIndex) -> None:
    checker = _checker()
    _write(index, "/r/a.png", "wd_tagger", "h1", "1girl, solo")
    _write(index, "/r/b.png", "wd_tagger", "h2", "1boy, solo")
    from daemon.report.checks import group_rows

    grouped = group_rows(index.report_captions("/r"))
    assert sorted(checker.stale(grouped, index.checked_keys("/r"))) == ["/r/a.png", "/r/b.png"]
    index.apply_checks(checker.results(grouped))
    assert checker.stale(grouped, index.checked_keys("/r")) == []
    _write(index, "/r/b.png", "vlm", "h2", "A boy.")  # a new caption
    grouped = group_rows(index.report_captions("/r"))
    assert checker.stale(grouped, index.checked_keys("/r")) == ["/r/b.png"]
    # another trigger word (the context) makes every image stale
    other = Checker(checker.sources, lambda p: Context(trigger="sks"))
    assert len(other.stale(grouped, index.checked_keys("/r"))) == 2


def test_a_huge_caption_is_checked_without_trouble() -> None:
    huge = ("A woman walks in the park. " * 40_000)[:1_000_000]
    found = findings("1girl, solo", huge)
    assert ("vlm", "repetition") in found  # the first 20,000 characters are enough
