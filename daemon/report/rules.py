"""The caption checks' rules, as data: word lists per tag group.

Tags are written as captiond writes them after post-processing (spaces, not
underscores; matched lower-case, with or without underscores). Words and phrases are
matched lower-case on word boundaries in the prose. To extend a rule, add a word or a
tag to its list; to add a rule of an existing kind, add an entry to its table. Bump
:data:`RULES_VERSION` when a list changes: every image is then checked again.

Kinds of rule (the engine is :mod:`daemon.report.checks`):

- :data:`EXCLUSIVE`: two sides that cannot both be true. Flagged when the tags name one
  side only and the prose the other side only (prose that names both sides is not
  flagged: "a woman and her son").
- :data:`COLOURS`: colour families of a body part (hair, eyes). Flagged when the prose
  names colours of that part, the tags name colours of it, and no family is shared.
- :data:`PEOPLE_TAGS` / :data:`NUMBER_WORDS` ...: the number of people from the tags,
  from the prose, from ``sksA:`` lines and from the people detected.
- Prose alone: :data:`ECHO_PATTERNS`, :data:`REFUSAL_PATTERNS`, :data:`DANGLING_WORDS`,
  :data:`REPEAT`, :data:`STOPWORDS` (language).
"""

from __future__ import annotations

from dataclasses import dataclass

RULES_VERSION = "1"


@dataclass(frozen=True, slots=True)
class Side:
    label: str  # how a reason names this side
    tags: frozenset[str]
    words: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Exclusive:
    check: str  # the flag's check_name
    a: Side
    b: Side


def _tags(*names: str) -> frozenset[str]:
    return frozenset(names)


def _w(words: str) -> frozenset[str]:
    """A set of words written as one string."""
    return frozenset(words.split())


FEMALE_COUNT = {"1girl": 1, "2girls": 2, "3girls": 3, "4girls": 4, "5girls": 5, "6+girls": 6}
MALE_COUNT = {"1boy": 1, "2boys": 2, "3boys": 3, "4boys": 4, "5boys": 5, "6+boys": 6}
OTHER_COUNT = {"1other": 1, "2others": 2, "3others": 3, "4others": 4, "5others": 5, "6+others": 6}
# Tags that say "at least this many" of a kind.
MULTIPLE = {"multiple girls": ("female", 2), "multiple boys": ("male", 2),
            "multiple others": ("other", 2)}  # fmt: skip
SOLO_TAGS = _tags("solo")
NO_HUMANS_TAGS = _tags("no humans")

FEMALE_TAGS = frozenset([*FEMALE_COUNT, "multiple girls"])
MALE_TAGS = frozenset([*MALE_COUNT, "multiple boys"])
PEOPLE_TAGS = FEMALE_TAGS | MALE_TAGS | frozenset([*OTHER_COUNT, "multiple others", "solo"])

FEMALE_WORDS = (
    "woman", "women", "girl", "girls", "lady", "ladies", "female", "females", "she", "her",
    "hers", "herself", "mother", "daughter", "sister", "sisters", "wife", "bride", "queen",
    "princess", "actress", "waitress", "schoolgirl", "schoolgirls", "maid", "nun",
    "grandmother", "aunt", "niece", "girlfriend", "businesswoman", "policewoman",
)  # fmt: skip
MALE_WORDS = (
    "man", "men", "boy", "boys", "gentleman", "gentlemen", "male", "males", "he", "him",
    "his", "himself", "father", "son", "brother", "brothers", "husband", "groom", "king",
    "prince", "actor", "waiter", "schoolboy", "schoolboys", "monk", "grandfather", "uncle",
    "nephew", "boyfriend", "businessman", "policeman", "bearded man",
)  # fmt: skip
PERSON_WORDS = (
    *FEMALE_WORDS, *MALE_WORDS, "person", "persons", "people", "child", "children", "kid",
    "kids", "baby", "toddler", "teenager", "teenagers", "adult", "adults", "human",
    "humans", "someone", "somebody", "crowd", "individual", "individuals",
)  # fmt: skip
NOBODY_WORDS = (
    "no people", "no one", "nobody", "no humans", "no person", "no persons",
    "without people", "unoccupied", "deserted", "devoid of people", "no one is",
)  # fmt: skip

INDOOR_WORDS = (
    "indoors", "indoor", "inside a", "inside the", "inside of", "in a room", "in the room",
    "in a bedroom", "in the bedroom", "in a kitchen", "in the kitchen", "living room",
    "in a bathroom", "in the bathroom", "in a classroom", "in the classroom",
    "in an office", "in the office", "in a hallway", "in the hallway", "in a corridor",
    "in a library", "in a cafe", "in a café", "in a restaurant", "in a studio",
    "on a bed", "on the bed", "on a couch", "on the couch", "on a sofa", "on the sofa",
    "in a gym", "in a shop", "in a store", "in a church", "in a bar", "in a hospital",
)  # fmt: skip
OUTDOOR_WORDS = (
    "outdoors", "outdoor", "in a park", "in the park", "on a beach", "on the beach",
    "in a forest", "in the forest", "in the woods", "in a field", "in the field",
    "in a garden", "in the garden", "on a street", "on the street", "in the street",
    "in a meadow", "on a mountain", "in the mountains", "in the snow", "in the rain",
    "under a blue sky", "under the sky", "in the countryside", "on a hill", "by the sea",
    "by a lake", "on a lake", "in the desert", "on a sidewalk", "on the sidewalk",
    "in a city street", "on a city street", "on a bridge", "in a parking lot",
    "at the beach", "on a rooftop", "on a balcony", "in a courtyard",
)  # fmt: skip

EXCLUSIVE: tuple[Exclusive, ...] = (
    Exclusive(
        "gender",
        Side("female", FEMALE_TAGS, FEMALE_WORDS),
        Side("male", MALE_TAGS, MALE_WORDS),
    ),
    Exclusive(
        "no_humans",
        Side("no people", NO_HUMANS_TAGS, NOBODY_WORDS),
        Side("people", PEOPLE_TAGS, PERSON_WORDS),
    ),
    Exclusive(
        "indoor_outdoor",
        Side("indoors", _tags("indoors"), INDOOR_WORDS),
        Side("outdoors", _tags("outdoors"), OUTDOOR_WORDS),
    ),
)

# Words before "of" (or "showing"...) that make what follows a picture, not a person in
# the scene ("a statue of a woman", "a poster of a beach"): the next few words are not
# read by the rules.
DEPICTIONS = (
    "statue", "statues", "sculpture", "painting", "paintings", "poster", "posters",
    "photo", "photograph", "picture", "drawing", "portrait", "mural", "figurine",
    "reflection", "silhouette", "illustration", "print", "cover", "figure", "doll",
    "toy", "model", "cutout", "billboard", "tattoo", "screen", "television", "tv",
)  # fmt: skip
DEPICTION_LINKS = ("of", "showing", "depicting", "featuring", "with")
DEPICTION_SPAN = 4  # words after "<depiction> of" that are skipped


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    tags: frozenset[str]  # e.g. "blonde hair" for the hair part
    words: tuple[str, ...]  # colour words in the prose


@dataclass(frozen=True, slots=True)
class ColourRule:
    check: str
    part: str  # the noun in the prose: "hair", "eyes"
    families: tuple[Family, ...]
    wildcards: frozenset[str]  # tags that make every colour plausible
    adjectives: tuple[str, ...]  # words allowed between the colour and the part
    standalone: dict[str, tuple[str, ...]]  # words that name the part's colour alone


_HAIR_ADJ = (
    "long", "short", "curly", "wavy", "straight", "shoulder-length", "medium-length",
    "messy", "braided", "flowing", "thick", "silky", "shiny", "cropped", "dark", "light",
    "bright", "pale", "slicked-back", "tousled", "voluminous", "neat", "loose", "fluffy",
    "spiky", "very", "and", "or", "dyed", "colored", "coloured", "hued", "toned", "deep",
)  # fmt: skip
_EYE_ADJ = (
    "big", "large", "bright", "dark", "light", "deep", "pale", "piercing", "striking",
    "wide", "almond-shaped", "round", "expressive", "sparkling", "glowing", "vivid",
    "and", "or", "colored", "coloured",
)  # fmt: skip

HAIR = ColourRule(
    "hair_colour",
    "hair",
    (
        Family("blonde", _tags("blonde hair"), ("blonde", "blond", "golden", "yellow",
                                               "platinum", "flaxen", "honey")),
        Family("brown", _tags("brown hair", "light brown hair"), ("brown", "brunette",
                                                                  "chestnut", "auburn",
                                                                  "chocolate", "hazel")),
        Family("black", _tags("black hair"), ("black", "jet-black", "raven", "ebony")),
        Family("red", _tags("red hair"), ("red", "ginger", "auburn", "copper", "crimson",
                                          "scarlet", "strawberry", "burgundy")),
        Family("orange", _tags("orange hair"), ("orange", "ginger", "copper")),
        Family("white", _tags("white hair", "grey hair", "silver hair"),
               ("white", "grey", "gray", "silver", "platinum", "ash")),
        Family("blue", _tags("blue hair", "light blue hair", "dark blue hair"),
               ("blue", "navy", "azure", "teal", "turquoise", "cyan")),
        Family("aqua", _tags("aqua hair"), ("aqua", "teal", "turquoise", "cyan", "blue",
                                            "green")),
        Family("green", _tags("green hair", "dark green hair"), ("green", "teal", "emerald",
                                                                 "mint")),
        Family("pink", _tags("pink hair"), ("pink", "rose", "magenta", "fuchsia",
                                            "strawberry")),
        Family("purple", _tags("purple hair"), ("purple", "violet", "lavender", "lilac",
                                                "magenta", "plum")),
    ),
    _tags("multicolored hair", "two-tone hair", "streaked hair", "gradient hair",
          "colored inner hair", "rainbow hair", "split-color hair", "colored tips"),
    _HAIR_ADJ,
    {"blonde": ("blonde",), "blond": ("blonde",), "brunette": ("brown",),
     "redhead": ("red", "orange"), "red-haired": ("red",), "blonde-haired": ("blonde",),
     "blond-haired": ("blonde",), "dark-haired": ("black", "brown", "blue", "purple"),
     "black-haired": ("black",), "brown-haired": ("brown",), "white-haired": ("white",),
     "silver-haired": ("white",), "grey-haired": ("white",), "gray-haired": ("white",),
     "pink-haired": ("pink",), "blue-haired": ("blue", "aqua"),
     "green-haired": ("green", "aqua"), "purple-haired": ("purple",)},
)  # fmt: skip

EYES = ColourRule(
    "eye_colour",
    "eyes",
    (
        Family("blue", _tags("blue eyes", "light blue eyes"), ("blue", "azure", "sapphire",
                                                               "icy", "teal", "cyan")),
        Family("green", _tags("green eyes"), ("green", "emerald", "jade", "hazel", "teal")),
        Family("brown", _tags("brown eyes"), ("brown", "hazel", "amber", "chocolate",
                                              "dark brown")),
        Family("red", _tags("red eyes"), ("red", "crimson", "scarlet", "ruby")),
        Family("purple", _tags("purple eyes"), ("purple", "violet", "lavender", "magenta")),
        Family("yellow", _tags("yellow eyes"), ("yellow", "golden", "gold", "amber")),
        Family("orange", _tags("orange eyes"), ("orange", "amber")),
        Family("pink", _tags("pink eyes"), ("pink", "magenta")),
        Family("grey", _tags("grey eyes", "silver eyes"), ("grey", "gray", "silver",
                                                           "steel")),
        Family("black", _tags("black eyes"), ("black", "dark")),
        Family("aqua", _tags("aqua eyes"), ("aqua", "teal", "turquoise", "cyan", "blue",
                                            "green")),
        Family("white", _tags("white eyes"), ("white", "pale")),
    ),
    _tags("heterochromia", "multicolored eyes", "gradient eyes", "rainbow eyes"),
    _EYE_ADJ,
    {"blue-eyed": ("blue", "aqua"), "green-eyed": ("green", "aqua"),
     "brown-eyed": ("brown",)},
)  # fmt: skip

COLOURS: tuple[ColourRule, ...] = (HAIR, EYES)

# The number of people in prose: "<number> [up to two words] <people noun>".
NUMBER_WORDS = {
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "2": 2,
    "3": 3,
    "4": 4,
    "5": 5,
    "6": 6,
    "7": 7,
    "8": 8,
    "9": 9,
    "10": 10,
    "both": 2,
    "several": 3,
    "many": 3,
    "multiple": 2,
}
PEOPLE_NOUNS = (
    "people", "persons", "women", "men", "girls", "boys", "children", "kids", "ladies",
    "gentlemen", "individuals", "friends", "adults", "teenagers", "characters", "students",
    "soldiers", "players", "dancers", "figures", "sisters", "brothers", "twins",
    "schoolgirls", "schoolboys", "couples", "of them",
)  # fmt: skip
# Words that may stand between the number and the noun ("two young women").
NUMBER_GAP_STOP = ("and", "or", "of", "with", "in", "on", "at", "the", "a", "an", "to")
# "At least three people".
CROWD_PHRASES = ("a group of people", "a crowd", "a group of friends", "a group of women",
                 "a group of men", "a group of girls", "a group of boys",
                 "a group of children", "a group of students")  # fmt: skip
# Exactly one person.
ALONE_PHRASES = ("by herself", "by himself", "on her own", "on his own", "she is alone",
                 "he is alone", "the only person", "the only one in")  # fmt: skip

# -- prose alone ----------------------------------------------------------------------------
# The prompt (or chat scaffolding) repeated in the caption. Regular expressions.
ECHO_PATTERNS = (
    r"\bdescribe (?:this|the) (?:image|picture|photo|photograph|scene)\b",
    r"\b(?:write|give|provide|generate) (?:me )?(?:a|an|the) (?:short |brief |detailed )?"
    r"(?:caption|description)\b",
    r"(?:^|\n)\s*(?:user|assistant|system|human|gpt)\s*:",
    r"<image>|<\|im_start\|>|<\|im_end\|>|\[/?inst\]|<end_of_utterance>",
    r"(?:^|\n)\s*(?:caption|description)\s*:",
)
# A describer that declined.
REFUSAL_PATTERNS = (
    r"\bi(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bi (?:cannot|can't|can not|won't) (?:help|assist|describe|provide|identify)\b",
    r"\bas an ai\b",
)
# A sentence cannot end on these: a caption that does was cut in the middle (often by
# max_new_tokens, with a period added by post-processing).
DANGLING_WORDS = _w(
    "a an the and or but nor of with to in on at for from by as into onto than is are was were "
    "be been being has have had their its my your our whose which while whereas because "
    "although if very such this these those"
)
TERMINAL = ".!?…"  # what a complete caption ends with (after quotes and brackets)


@dataclass(frozen=True, slots=True)
class Repeat:
    """A phrase of ``min_words``..``max_words`` words repeated ``times`` or more, or of
    ``long_words`` or more repeated ``long_times`` or more; or one word ``run`` times in
    a row."""

    min_words: int = 3
    max_words: int = 12
    times: int = 3
    long_words: int = 6
    long_times: int = 2
    run: int = 4


REPEAT = Repeat()

# Stop words per language (the most common words of each): a caption whose words are
# far more often another language's stop words than the configured one's is flagged.
STOPWORDS: dict[str, frozenset[str]] = {
    "en": _w(
        "the a an and of in on with is are to at her his their its this that from by for "
        "wearing while which who has"
    ),
    "de": _w(
        "der die das und ein eine einen einem einer mit ist sind auf im den dem des von zu "
        "trägt sich vor über"
    ),
    "fr": _w("le la les un une et des du de avec est sont dans sur au aux se qui porte devant"),
    "es": _w("el la los las un una y con es son en del al que lleva sobre frente está están"),
    "it": _w("il lo la gli le un una e con è sono nel nella di del della che indossa sul"),
    "pt": _w("o a os as um uma e com é são em no na do da que usando sobre está"),
    "nl": _w("de het een en met is zijn op in van die draagt staat voor"),
}
# Scripts that are not Latin, by Unicode range: letters of these in a caption configured
# for a Latin-script language.
SCRIPTS: tuple[tuple[str, int, int], ...] = (
    ("Cyrillic", 0x0400, 0x04FF),
    ("Greek", 0x0370, 0x03FF),
    ("Arabic", 0x0600, 0x06FF),
    ("Hebrew", 0x0590, 0x05FF),
    ("Devanagari", 0x0900, 0x097F),
    ("Thai", 0x0E00, 0x0E7F),
    ("Hangul", 0xAC00, 0xD7AF),
    ("Japanese kana", 0x3040, 0x30FF),
    ("CJK", 0x4E00, 0x9FFF),
)
LANGUAGE_MIN_WORDS = 6  # shorter captions are not judged
