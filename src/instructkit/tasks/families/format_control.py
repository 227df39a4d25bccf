"""Output format and length control (cluster "format_control"): JSON, bullet lists, joins, repetition, casing and
word limits. Every answer is determined by the input, so exact match scores it."""

from __future__ import annotations

import json
import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import CITIES, NAMES, NOUNS, OBJECTS, ex, tpl


def _json(rng: random.Random):
    n, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)[0]
    return ex(json.dumps({"name": n, "age": age, "city": city}), name=n, age=age, city=city)


def _items(rng: random.Random) -> list[str]:
    return rng.sample(NOUNS, rng.randint(2, 5))


def _bullets(rng):
    items = _items(rng)
    return ex("\n".join(f"- {i}" for i in items), items=", ".join(items))


def _numbered(rng):
    items = _items(rng)
    return ex("\n".join(f"{k}. {i}" for k, i in enumerate(items, 1)), items=", ".join(items))


def _semicolons(rng):
    items = _items(rng)
    return ex("; ".join(items), items=" ".join(items))


def _repeat(rng):
    w, k = rng.choice(OBJECTS), rng.randint(2, 6)
    return ex(" ".join([w] * k), word=w, k=k)


def _first_words(rng):
    words = f"the {rng.choice(NOUNS)} near the {rng.choice(NOUNS)} was bigger than the {rng.choice(NOUNS)}".split()
    k = rng.randint(2, 5)
    return ex(" ".join(words[:k]), sentence=" ".join(words), k=k)


def _title(rng):
    words = [rng.choice(NOUNS) for _ in range(rng.randint(2, 4))]
    s = "the " + " of the ".join(words)
    return ex(" ".join(w.capitalize() for w in s.split()), sentence=s)


def tasks() -> list[Task]:
    return [
        Task("json_record", "format_control", tpl(
            "Return a JSON object with the keys name, age and city for: {name}, {age}, lives in {city}. "
            "Output only the JSON.",
            "Name: {name}\nAge: {age}\nCity: {city}\n\nConvert this record to a JSON object with keys name, age, city.",
            "Write {name} (age {age}, from {city}) as JSON: {{\"name\": ..., \"age\": ..., \"city\": ...}}",
            "Format as JSON (keys: name, age, city; age is a number): {name}; {age}; {city}",
            "Produce a single-line JSON object describing this person. name={name} age={age} city={city}",
            "Encode the following as JSON with fields name, age and city.\n{name} is {age} years old and lives in "
            "{city}.",
        ), "exact_match", generator=_json),
        Task("bullet_list", "format_control", tpl(
            "Turn this comma-separated list into a bulleted list using \"- \": {items}",
            "{items}\n\nFormat the items above as bullet points, one per line.",
            "Write each item on its own line starting with a dash.\nItems: {items}",
            "Make a markdown bullet list of: {items}",
            "List these as bullets: {items}",
        ), "exact_match", generator=_bullets),
        Task("numbered_list", "format_control", tpl(
            "Turn this comma-separated list into a numbered list: {items}",
            "{items}\n\nWrite the items above as a numbered list (1., 2., ...).",
            "Number these items, one per line: {items}",
            "Make an ordered list from: {items}",
            "Format as a numbered list, keeping the order: {items}",
        ), "exact_match", generator=_numbered),
        Task("join_semicolons", "format_control", tpl(
            "Join these words with \"; \": {items}", "Separate the words with semicolons: {items}",
            "{items}\n\nRewrite the words above separated by a semicolon and a space.",
            "Words: {items}\nSemicolon-separated:", "Put \"; \" between each of these words: {items}",
        ), "exact_match", generator=_semicolons),
        Task("repeat_word", "format_control", tpl(
            "Repeat the word \"{word}\" {k} times, separated by spaces.", "Write {word} exactly {k} times.",
            "Say \"{word}\" {k} times in a row, with a space between each.",
            "Output the word {word} repeated {k} times.", "{k} times: {word}. Go.",
        ), "exact_match", generator=_repeat),
        Task("first_k_words", "format_control", tpl(
            "Return only the first {k} words of this sentence: {sentence}",
            "{sentence}\n\nCopy the first {k} words of the sentence above, nothing else.",
            "Sentence: {sentence}\nFirst {k} words:", "Truncate to {k} words: {sentence}",
            "Answer with exactly {k} words: the beginning of \"{sentence}\".",
        ), "exact_match", generator=_first_words),
        Task("title_case", "format_control", tpl(
            "Convert to title case: {sentence}", "Capitalise the first letter of every word: {sentence}",
            "{sentence}\n\nRewrite the phrase above in title case.", "Make this a title: {sentence}",
            "Phrase: {sentence}\nTitle Case:",
        ), "exact_match", generator=_title),
    ]
