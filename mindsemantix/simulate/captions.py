"""A small caption grammar for the simulated scenes: synonyms and varied word order.

Like COCO, every image gets several (default 5) differently worded reference captions. Each
caption names what is certain to matter (shape, colour; the count of a group; the relation of a
pair) and, at random, some of the rest (size, place, background), as human captions do. The
vocabulary stays small (about 90 words) so a small model can learn it, and the synonyms make
n-gram metrics reward meaning rather than one fixed template.
"""

from __future__ import annotations

import numpy as np

from .scenes import Scene, SceneObject

SHAPE_WORDS = {  # singular, plural
    "circle": [("circle", "circles"), ("disk", "disks")],
    "square": [("square", "squares"), ("block", "blocks")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "heart": [("heart", "hearts")],
}
COLOUR_WORDS = {
    "red": ["red"], "orange": ["orange"], "yellow": ["yellow"], "green": ["green"],
    "blue": ["blue"], "purple": ["purple", "violet"], "pink": ["pink"], "white": ["white"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
COUNT_WORDS = {2: ["two", "a pair of"], 3: ["three"]}
PLACE_WORDS = {
    "top left": ["in the top left corner", "at the top left", "in the upper left"],
    "top right": ["in the top right corner", "at the top right", "in the upper right"],
    "bottom left": ["in the bottom left corner", "at the bottom left", "in the lower left"],
    "bottom right": ["in the bottom right corner", "at the bottom right", "in the lower right"],
    "top": ["at the top", "near the top"],
    "bottom": ["at the bottom", "near the bottom"],
    "left": ["on the left", "on the left side"],
    "right": ["on the right", "on the right side"],
    "center": ["in the center", "in the middle"],
}
BACKGROUND_WORDS = {
    "gray": ["on a gray background", "against a grey background", "on gray"],
    "black": ["on a black background", "against a dark background", "on black"],
    "striped": ["on a striped background", "against stripes", "on a striped wall"],
    "grass": ["on the grass", "in a grassy field", "outdoors on the grass"],
}
RELATION_WORDS = {
    "left of": ["to the left of", "left of"],
    "right of": ["to the right of", "right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
}
# Saying "B is right of A" instead of "A is left of B" varies the word order, not the meaning.
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
P_MENTION = 0.75  # chance that a caption mentions each optional attribute


def _pick(rng: np.random.Generator, options: list):
    return options[rng.integers(len(options))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: np.random.Generator, obj: SceneObject, with_size: bool) -> str:
    """'a big red circle' / 'a red circle' / 'a big circle colored red'."""
    noun = _pick(rng, SHAPE_WORDS[obj.shape])[0]
    colour = _pick(rng, COLOUR_WORDS[obj.colour])
    size = _pick(rng, SIZE_WORDS[obj.size]) if with_size else None
    if size and rng.random() < 0.2:
        return f"{_article(size)} {size} {noun} colored {colour}"
    words = " ".join(w for w in (size, colour, noun) if w)
    return f"{_article(words)} {words}"


def _group_phrase(rng: np.random.Generator, obj: SceneObject, count: int, with_size: bool) -> str:
    """'three small blue stars'."""
    noun = _pick(rng, SHAPE_WORDS[obj.shape])[1]
    colour = _pick(rng, COLOUR_WORDS[obj.colour])
    size = _pick(rng, SIZE_WORDS[obj.size]) if with_size else None
    return " ".join(w for w in (_pick(rng, COUNT_WORDS[count]), size, colour, noun) if w)


def _finish(text: str) -> str:
    text = " ".join(text.split())
    return text[0].upper() + text[1:] + "."


def _single(rng: np.random.Generator, scene: Scene) -> str:
    obj = scene.objects[0]
    np_ = _noun_phrase(rng, obj, rng.random() < P_MENTION)
    place = _pick(rng, PLACE_WORDS[obj.place]) if rng.random() < P_MENTION else ""
    bg = _pick(rng, BACKGROUND_WORDS[scene.background]) if rng.random() < P_MENTION else ""
    form = rng.integers(4)
    if form == 0:
        return _finish(f"{np_} {place} {bg}")
    if form == 1:
        return _finish(f"there is {np_} {place} {bg}")
    if form == 2 and bg:
        return _finish(f"{bg}, {np_} {place}")
    if place:
        return _finish(f"{place} is {np_} {bg}")
    return _finish(f"a picture of {np_} {bg}")


def _one_of_three(rng: np.random.Generator, bg: str, first: str, second: str, with_bg: str, without_bg: str) -> str:
    """One of three sentence forms, drawn uniformly; the third leads with the background when one was
    mentioned."""
    form = rng.integers(3)
    if form == 2:
        return _finish(with_bg if bg else without_bg)
    return _finish(first if form == 0 else second)


def _group(rng: np.random.Generator, scene: Scene) -> str:
    phrase = _group_phrase(rng, scene.objects[0], scene.count, rng.random() < P_MENTION)
    bg = _pick(rng, BACKGROUND_WORDS[scene.background]) if rng.random() < P_MENTION else ""
    return _one_of_three(rng, bg, f"{phrase} {bg}", f"there are {phrase} {bg}", f"{bg}, {phrase}",
                         f"a picture of {phrase}")


def _pair(rng: np.random.Generator, scene: Scene) -> str:
    a, b = scene.objects
    relation = scene.relation
    if rng.random() < 0.4:  # describe it from the other object's side
        a, b, relation = b, a, INVERSE_RELATION[relation]
    np_a = _noun_phrase(rng, a, rng.random() < P_MENTION)
    np_b = _noun_phrase(rng, b, rng.random() < P_MENTION)
    rel = _pick(rng, RELATION_WORDS[relation])
    bg = _pick(rng, BACKGROUND_WORDS[scene.background]) if rng.random() < P_MENTION else ""
    return _one_of_three(rng, bg, f"{np_a} {rel} {np_b} {bg}", f"{np_a} is {rel} {np_b} {bg}",
                         f"{bg}, {np_a} {rel} {np_b}", f"there is {np_a} {rel} {np_b}")


def describe(scene: Scene, rng: np.random.Generator, n: int = 5, max_tries: int = 200) -> list[str]:
    """`n` distinct captions of one scene (fewer only if the grammar cannot make that many)."""
    make = {"single": _single, "group": _group, "pair": _pair}[scene.layout]
    captions: list[str] = []
    for _ in range(max_tries):
        c = make(rng, scene)
        if c not in captions:
            captions.append(c)
        if len(captions) == n:
            break
    return captions


def canonical_caption(scene: Scene) -> str:
    """One fixed, complete wording (every attribute named): a deterministic prompt for the
    scene, e.g. for training a text-to-image model on the simulated world."""
    if scene.layout == "single":
        o = scene.objects[0]
        return _finish(f"{_article(o.size)} {o.size} {o.colour} {o.shape} "
                       f"{PLACE_WORDS[o.place][0]} {BACKGROUND_WORDS[scene.background][0]}")
    if scene.layout == "group":
        o = scene.objects[0]
        return _finish(f"{COUNT_WORDS[scene.count][0]} {o.size} {o.colour} "
                       f"{SHAPE_WORDS[o.shape][0][1]} {BACKGROUND_WORDS[scene.background][0]}")
    a, b = scene.objects
    return _finish(f"{_article(a.size)} {a.size} {a.colour} {a.shape} "
                   f"{RELATION_WORDS[scene.relation][0]} {_article(b.size)} {b.size} {b.colour} "
                   f"{b.shape} {BACKGROUND_WORDS[scene.background][0]}")


def vocabulary() -> list[str]:
    """Every word the grammar can produce (lower case, punctuation stripped), sorted."""
    words = set("a an there is are of picture colored , .".split())
    tables = [SIZE_WORDS, COLOUR_WORDS, PLACE_WORDS, BACKGROUND_WORDS, RELATION_WORDS]
    for table in tables:
        for options in table.values():
            for phrase in options:
                words.update(phrase.lower().split())
    for options in COUNT_WORDS.values():
        for phrase in options:
            words.update(phrase.split())
    for options in SHAPE_WORDS.values():
        for singular, plural in options:
            words.update(singular.split() + plural.split())
    words.discard(",")
    words.discard(".")
    return sorted(words)
