"""Regenerate ``ckptsync/examples/data/tiny_corpus.txt``, the corpus the example trains on.

The text is written from the fragments below by a seeded random generator, so it is
deterministic, free of any copyright, and needs no download. Run from the repository root::

    python examples/data/make_corpus.py
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

ANIMALS = ["fox", "crow", "hare", "tortoise", "wolf", "lamb", "lion", "mouse", "ant",
           "grasshopper", "goat", "owl", "heron", "frog", "ox", "dog", "cat", "sparrow"]
PLACES = ["by the river", "at the edge of the wood", "in the old mill", "on the hill",
          "near the village well", "under the oak tree", "in the wheat field",
          "beside the pond", "on the high road", "in the shepherd's barn"]
TIMES = ["One cold morning", "Late in the summer", "At the turn of the year",
         "Long ago", "When the snow had gone", "On a market day", "In the time of the harvest",
         "Before the sun was up", "After a week of rain", "One quiet evening"]
WANTS = ["a piece of cheese", "a drink of clear water", "a warm place to sleep",
         "the ripest grapes on the vine", "a safe road home", "the praise of the others",
         "a share of the grain", "the shade of the tall trees", "news of the king",
         "a friend to talk with"]
VERBS = ["asked", "begged", "told", "warned", "mocked", "thanked", "followed", "watched",
         "called to", "laughed at"]
ADJS = ["proud", "patient", "hungry", "clever", "foolish", "kind", "greedy", "quiet",
        "tired", "honest", "boastful", "careful"]
MORALS = [
    "Slow and steady wins the race.",
    "A friend in need is a friend indeed.",
    "Look before you leap.",
    "Pride goes before a fall.",
    "Little by little does the trick.",
    "Do not count your chickens before they are hatched.",
    "It is easy to despise what you cannot get.",
    "Kindness is never wasted.",
    "Those who boast of deeds seldom do them.",
    "Work today, and you will eat tomorrow.",
    "Union gives strength.",
    "Honesty is the best policy.",
]
TITLES = ["The {a} and the {b}", "The {adj} {a}", "How the {a} Found {want}",
          "The {a}, the {b} and the Well", "Why the {a} Sleeps by Day"]


def sentence(rng: random.Random, a: str, b: str) -> str:
    forms = [
        lambda: f"The {a} {rng.choice(VERBS)} the {b} {rng.choice(PLACES)}.",
        lambda: f"\"I want {rng.choice(WANTS)},\" said the {a}, \"and I will wait for it.\"",
        lambda: f"The {b} was {rng.choice(ADJS)}, and said nothing for a long while.",
        lambda: f"So the {a} went {rng.choice(PLACES)}, looking for {rng.choice(WANTS)}.",
        lambda: f"\"Why do you hurry?\" asked the {b}. \"The day is long and the road is "
                f"{rng.choice(['short', 'dusty', 'wide', 'steep'])}.\"",
        lambda: f"But the {a} was {rng.choice(ADJS)} and would not listen.",
        lambda: f"At last the {b} came back with {rng.choice(WANTS)} and shared it.",
        lambda: f"Nobody {rng.choice(PLACES)} had ever seen so {rng.choice(ADJS)} a {a}.",
        lambda: f"The {a} counted {rng.randint(2, 19)} stones and {rng.randint(2, 9)} "
                f"feathers, and was content.",
    ]
    return rng.choice(forms)()


def fable(rng: random.Random) -> str:
    a, b = rng.sample(ANIMALS, 2)
    title = rng.choice(TITLES).format(a=a.title(), b=b.title(), adj=rng.choice(ADJS).title(),
                                      want=rng.choice(WANTS).title())
    body = [f"{rng.choice(TIMES)}, a {rng.choice(ADJS)} {a} met a {b} {rng.choice(PLACES)}."]
    body += [sentence(rng, a, b) for _ in range(rng.randint(5, 9))]
    body.append(f"Moral: {rng.choice(MORALS)}")
    return title + "\n\n" + textwrap.fill(" ".join(body), width=78) + "\n"


def make(size: int = 48_000, seed: int = 1234) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        parts.append(fable(rng))
        total += len(parts[-1]) + 1
    return "\n".join(parts)


if __name__ == "__main__":
    # The corpus ships in the package, beside the trainer that reads it.
    out = Path(__file__).resolve().parents[2] / "ckptsync" / "examples" / "data" / "tiny_corpus.txt"
    out.write_text(make())
    print(f"wrote {out} ({out.stat().st_size} bytes)")
