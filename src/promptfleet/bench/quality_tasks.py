"""Tasks for ``promptfleet bench quality``, generated deterministically from a seed.

Each task is a train set and a held-out test set of ``{"prompt", "completion"}`` examples
(JSONL bytes, the format a tenant uploads). The test sets are held out by content, not
only by example: test sentences use adjectives/nouns that no training sentence uses, test
countries are not among the training countries, and test phrases use words the training
phrases do not.

- ``sentiment``: a short product or film review -> `` positive`` / `` negative``.
- ``capital_json``: a country -> its capital in a fixed JSON answer format,
  `` {"capital": "Paris"}`` (facts a small model knows, in a format it has to learn).
- ``normalize``: a short phrase in Title Case with punctuation -> lower case, no
  punctuation (a text normalization).
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

POSITIVE = ["great", "wonderful", "excellent", "lovely", "fantastic", "brilliant", "charming", "perfect",
            "superb", "delightful", "amazing", "outstanding", "enjoyable", "beautiful"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "poor", "annoying", "broken", "useless",
            "horrible", "dull", "disappointing", "weak", "painful", "ugly"]
SUBJECTS = ["the movie", "this phone", "the hotel", "the food", "this book", "the service", "the game",
            "this album", "the show", "the laptop", "the concert", "this chair", "the app", "the trip",
            "the camera", "this jacket"]
TEMPLATES = ["{s} was {a}.", "I thought {s} was {a}.", "Honestly, {s} is {a}.", "{S} felt {a} overall.",
             "All in all, {s} was {a}.", "My verdict: {s} is {a}."]

# Countries whose capital SmolLM2-135M-Instruct names when asked "The capital of X is" (greedy),
# checked once: 38 of the 62 first listed; the others (e.g. Australia -> Sydney, Turkey -> Istanbul)
# were dropped, since this task is about an answer format over facts the model knows.
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("England", "London"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Kenya", "Nairobi"), ("Mexico", "Mexico City"),
    ("Canada", "Ottawa"), ("Netherlands", "Amsterdam"), ("Czech Republic", "Prague"), ("Chile", "Santiago"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Vietnam", "Hanoi"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Israel", "Jerusalem"),
    ("Syria", "Damascus"), ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"), ("Ethiopia", "Addis Ababa"),
    ("Iceland", "Reykjavik"),
]

PHRASE_WORDS = ["red", "blue", "green", "big", "small", "old", "new", "fast", "slow", "happy", "cold", "warm",
                "dog", "cat", "house", "car", "tree", "river", "city", "garden", "window", "door", "bird",
                "road", "book", "table", "light", "night", "morning", "water", "stone", "music", "paper",
                "train", "horse", "flower", "bridge", "market", "forest", "island", "letter", "friend"]
PUNCTUATION = [".", "!", "?", ",", ";", ":"]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    train: list[dict[str, str]]
    test: list[dict[str, str]]


def to_jsonl(examples: list[dict[str, str]]) -> bytes:
    return ("\n".join(json.dumps(e) for e in examples) + "\n").encode()


def _review(rng: random.Random, adjectives: list[str], subjects: list[str]) -> str:
    subject, template = rng.choice(subjects), rng.choice(TEMPLATES)
    return template.format(s=subject, S=subject[0].upper() + subject[1:], a=rng.choice(adjectives)).capitalize()


def sentiment(seed: int, n_train: int, n_test: int) -> Task:
    rng = random.Random(seed)
    pos, neg, subjects = POSITIVE[:], NEGATIVE[:], SUBJECTS[:]
    for words in (pos, neg, subjects):
        rng.shuffle(words)
    cut_a, cut_s = len(pos) * 2 // 3, len(subjects) * 3 // 4

    def make(n: int, test: bool) -> list[dict[str, str]]:
        out = []
        for i in range(n):
            label = "positive" if i % 2 == 0 else "negative"
            words = pos if label == "positive" else neg
            adjectives = words[cut_a:] if test else words[:cut_a]
            text = _review(rng, adjectives, subjects[cut_s:] if test else subjects[:cut_s])
            out.append({"prompt": f"Review: {text}\nSentiment:", "completion": f" {label}"})
        rng.shuffle(out)
        return out

    return Task("sentiment", "review -> positive/negative (test adjectives and subjects unseen)",
                make(n_train, False), make(n_test, True))


def capital_json(seed: int, n_train: int, n_test: int) -> Task:
    rng = random.Random(seed)
    pairs = CAPITALS[:]
    rng.shuffle(pairs)
    n_test = min(n_test, len(pairs) // 2)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]

    def example(country: str, capital: str) -> dict[str, str]:
        return {"prompt": f"Country: {country}\nJSON:", "completion": " " + json.dumps({"capital": capital})}

    train = [example(*train_pairs[i % len(train_pairs)]) for i in range(n_train)]
    return Task("capital_json", 'country -> {"capital": ...} (test countries unseen)', train,
                [example(*p) for p in test_pairs])


def normalize(seed: int, n_train: int, n_test: int) -> Task:
    rng = random.Random(seed)
    words = PHRASE_WORDS[:]
    rng.shuffle(words)
    cut = len(words) * 2 // 3

    def make(n: int, vocabulary: list[str]) -> list[dict[str, str]]:
        out = []
        for _ in range(n):
            phrase = rng.sample(vocabulary, rng.randint(2, 4))
            shown = " ".join(w.capitalize() for w in phrase)
            if rng.random() < 0.5:
                shown = shown.replace(" ", ", ", 1)
            shown += rng.choice(PUNCTUATION[:3])
            out.append({"prompt": f"Text: {shown}\nNormalized:", "completion": " " + " ".join(phrase)})
        return out

    return Task("normalize", "Title Case, punctuated -> lower case, no punctuation (test words unseen)",
                make(n_train, words[:cut]), make(n_test, words[cut:]))


TASKS: dict[str, Callable[[int, int, int], Task]] = {
    "sentiment": sentiment, "capital_json": capital_json, "normalize": normalize,
}
