"""Built-in instruction data, shipped inside the package: `builtin:NAME` as a data source path.

- ``quickstart_train``: a few hundred short, diverse instruction/response conversations written for this project
  (explanation, classification, extraction, summarisation, rewriting and translation, short math, code, format and
  length following, multi-turn, refusals of harmful requests and helpful answers to benign look-alikes). Responses are
  short on purpose: the quickstart tunes a 270M model on a 2-core CPU in minutes, and what it must learn first is the
  turn protocol: answer, then end the turn.
- ``quickstart_heldout``: instructions that never appear in training, each with a short reference answer, for the
  before/after generations and the held-out loss.

Most examples are hand-written. The ones whose answer can be computed exactly (arithmetic, sorting, case changes,
counting, JSON and list formatting) come from ``generated_examples()``, deterministic for its seed and versioned with
``GENERATOR_VERSION``; they are stored in the JSONL too (meta.source == "generated"), and a test checks the stored ones
equal a fresh generation. Every record's ``meta`` names its category and source.
"""

from __future__ import annotations

import json
import random
from importlib import resources

from instructkit.data.schema import Conversation, DataError, Message

GENERATOR_VERSION = "quickstart-gen-v1"
GENERATOR_SEED = 0

BUILTIN = {
    "quickstart_train": "quickstart_train.jsonl",
    "quickstart_heldout": "quickstart_heldout.jsonl",
}


def names() -> list[str]:
    return sorted(BUILTIN)


def load_builtin(name: str) -> list[Conversation]:
    """The built-in data set ``name`` as validated Conversations (errors name the file and line)."""
    if name.startswith("builtin:"):
        name = name[len("builtin:"):]
    if name not in BUILTIN:
        raise DataError(f"unknown built-in data set '{name}'; known: {', '.join(names())}", source=f"builtin:{name}")
    res = resources.files("instructkit").joinpath("resources", "data", BUILTIN[name])
    source = f"builtin:{name}"
    out: list[Conversation] = []
    with res.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Conversation.from_dict(json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg}", source=source, line=lineno) from e
            except DataError as e:
                raise e.at(source, line=lineno) from e
    return out


def _conv(user: str, answer: str, category: str) -> Conversation:
    return Conversation(
        [Message("user", user), Message("assistant", answer)],
        {"category": category, "source": "generated", "generator": GENERATOR_VERSION},
    )


_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve"]
_ITEMS = ["apples", "pencils", "stamps", "marbles", "cookies", "books", "stickers", "shells"]
_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Luis", "Maya",
          "Nils", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara"]
_CITIES = ["Lima", "Oslo", "Cairo", "Seoul", "Dublin", "Quito", "Hanoi", "Vienna", "Nairobi", "Perth", "Porto",
           "Krakow"]
_WORDS = ["river", "planet", "garden", "window", "forest", "violin", "candle", "bridge", "pepper", "island", "market",
          "rocket", "ladder", "mirror", "orange", "tunnel", "harbor", "desert", "pillow", "button", "castle", "meadow"]
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "Learning a new language takes patience",
    "Fresh bread smells wonderful in the morning",
    "Our team won the final match",
    "Please close the window before you leave",
    "The library opens at nine on Saturdays",
    "Bright stars filled the clear night sky",
    "She painted the fence a pale shade of green",
    "Heavy rain delayed the morning train",
    "Good coffee makes a slow morning better",
    "The children built a castle of sand",
    "Every small step counts toward a big goal",
]


def generated_examples(seed: int = GENERATOR_SEED) -> list[Conversation]:
    """Examples whose answers are computed, so they are exactly right. Deterministic for ``seed``."""
    rng = random.Random(seed)
    out: list[Conversation] = []

    for _ in range(12):  # addition, two phrasings
        a, b = rng.randint(11, 89), rng.randint(11, 89)
        q = rng.choice([f"What is {a} plus {b}?", f"Calculate {a} + {b}."])
        out.append(_conv(q, f"{a} + {b} = {a + b}.", "math"))
    for _ in range(8):  # subtraction with a non-negative result
        a, b = sorted((rng.randint(20, 99), rng.randint(1, 60)), reverse=True)
        out.append(_conv(f"What is {a} minus {b}?", f"{a} - {b} = {a - b}.", "math"))
    for _ in range(10):  # multiplication tables
        a, b = rng.randint(2, 12), rng.randint(3, 12)
        q = rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}."])
        out.append(_conv(q, f"{a} x {b} = {a * b}.", "math"))
    for _ in range(6):  # exact division
        b, c = rng.randint(2, 9), rng.randint(2, 12)
        out.append(_conv(f"What is {b * c} divided by {b}?", f"{b * c} / {b} = {c}.", "math"))
    for _ in range(10):  # one-step word problems
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        have, more = rng.randint(3, 20), rng.randint(2, 15)
        if rng.random() < 0.5:
            q = f"{name} has {have} {item} and gets {more} more. How many {item} does {name} have now?"
            ans = f"{name} has {have} + {more} = {have + more} {item}."
        else:
            have = have + more
            q = f"{name} has {have} {item} and gives away {more}. How many {item} are left?"
            ans = f"{name} has {have} - {more} = {have - more} {item} left."
        out.append(_conv(q, ans, "math"))
    for _ in range(4):  # unit conversion
        h = rng.randint(2, 9)
        out.append(_conv(f"How many minutes are in {h} hours?", f"{h} hours = {h} x 60 = {h * 60} minutes.", "math"))
    for _ in range(4):  # comparison
        x = rng.randint(21, 84)
        y = x + rng.choice([-5, 5])
        out.append(_conv(f"Which is larger, {x} or {y}?", f"{max(x, y)} is larger.", "math"))

    for _ in range(8):  # sort words alphabetically
        words = rng.sample(_WORDS, rng.randint(3, 5))
        out.append(_conv(f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words)),
                         "format"))
    for _ in range(6):  # sort numbers
        nums = rng.sample(range(1, 100), rng.randint(4, 6))
        out.append(_conv(f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.",
                         ", ".join(map(str, sorted(nums))), "format"))
    sentences = rng.sample(_SENTENCES, len(_SENTENCES))
    for s in sentences[:4]:
        out.append(_conv(f"Convert to uppercase: \"{s}.\"", s.upper() + ".", "format"))
    for s in sentences[4:8]:
        out.append(_conv(f"Rewrite in all lowercase: \"{s}.\"", s.lower() + ".", "format"))
    for s in sentences[8:12]:
        n = len(s.split())
        out.append(_conv(f"How many words are in this sentence? \"{s}.\"", f"{n} words.", "format"))
    for _ in range(8):  # comma list -> bullets / numbered
        words = rng.sample(_WORDS, rng.randint(3, 4))
        if rng.random() < 0.5:
            out.append(_conv(f"Turn this into a bulleted list: {', '.join(words)}",
                             "\n".join(f"- {w}" for w in words), "format"))
        else:
            out.append(_conv(f"Turn this into a numbered list: {', '.join(words)}",
                             "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1)), "format"))
    for _ in range(8):  # record -> JSON
        name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(19, 70)
        q = rng.choice([
            f"Write {name}'s details as JSON with keys name, age and city: {name} is {age} and lives in {city}.",
            f"Return JSON with keys name, age and city for this person: {name}, {age} years old, from {city}.",
        ])
        out.append(_conv(q, json.dumps({"name": name, "age": age, "city": city}), "format"))
    for _ in range(6):  # first / last letter, count letters
        w = rng.choice(_WORDS)
        kind = rng.randrange(3)
        if kind == 0:
            out.append(_conv(f"What is the first letter of the word \"{w}\"?", w[0], "format"))
        elif kind == 1:
            out.append(_conv(f"What is the last letter of the word \"{w}\"?", w[-1], "format"))
        else:
            out.append(_conv(f"How many letters are in the word \"{w}\"?", f"{len(w)}", "format"))
    for _ in range(4):  # number words
        n = rng.randint(0, 12)
        out.append(_conv(f"Write the number {n} in words.", _NUMBER_WORDS[n], "format"))

    # Drop exact duplicate prompts a random draw may produce; keep the first.
    seen: set[str] = set()
    unique = []
    for conv in out:
        key = conv.messages[0].content
        if key not in seen:
            seen.add(key)
            unique.append(conv)
    return unique
