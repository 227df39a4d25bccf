"""Named entities and information extraction (cluster "extraction"). Generated sentences, so the entities and their
order are known exactly; answers are comma-separated in order of appearance (exact match)."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import CITIES, MONTHS, NAMES, NOUNS, ex, tpl


def _extract_templates(what: str) -> list:
    return tpl(
        f"Extract all {what} from the text. List them in order, separated by commas.\n\n{{text}}",
        f"{{text}}\n\nWhich {what} are mentioned above? Answer with a comma-separated list.",
        f"Text: {{text}}\n{what.capitalize()}:",
        f"Find every {what[:-1] if what.endswith('s') else what} in this sentence and list them separated by "
        f"commas, in the order they appear: {{text}}",
        f"Read the passage and return the {what} it contains, comma separated.\nPassage: {{text}}",
        f"List the {what} in the following text.\n{{text}}",
    )


def _persons(rng: random.Random):
    a, b, c = rng.sample(NAMES, 3)
    city = rng.choice(CITIES)[0]
    form = rng.randrange(3)
    if form == 0:
        return _e(f"{a}, {b}", f"{a} met {b} at the {rng.choice(NOUNS)} in {city}.")
    if form == 1:
        return _e(f"{a}, {b}, {c}", f"Yesterday {a} called {b}, and later {c} joined them in {city}.")
    return _e(a, f"The letter from {a} arrived in {city} on time.")


def _e(target: str, text: str):
    return ex(target, text=text)


def _cities(rng: random.Random):
    (c1, _), (c2, _) = rng.sample(CITIES, 2)
    n = rng.choice(NAMES)
    if rng.random() < 0.5:
        return _e(f"{c1}, {c2}", f"{n} flew from {c1} to {c2} last week.")
    return _e(c1, f"{n} has lived in {c1} for ten years.")


def _numbers(rng: random.Random):
    a, b = rng.randint(2, 99), rng.randint(100, 999)
    n = rng.choice(NAMES)
    return _e(f"{a}, {b}", f"{n} bought {a} tickets and paid {b} dollars in total.")


def _emails(rng: random.Random):
    a, b = rng.sample(NAMES, 2)
    dom = rng.choice(["example.com", "mail.org", "school.edu"])
    e1, e2 = f"{a.lower()}@{dom}", f"{b.lower()}.{rng.randint(1, 99)}@{dom}"
    if rng.random() < 0.5:
        return _e(e1, f"Please write to {e1} if you have questions.")
    return _e(f"{e1}, {e2}", f"Send the draft to {e1} and copy {e2} on the message.")


def _dates(rng: random.Random):
    d1 = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1990, 2030)}"
    d2 = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1990, 2030)}"
    n = rng.choice(NAMES)
    if rng.random() < 0.5:
        return _e(d1, f"{n} started the new job on {d1}.")
    return _e(f"{d1}, {d2}", f"The project ran from {d1} until {d2}, led by {n}.")


def tasks() -> list[Task]:
    return [
        Task("ner_person", "extraction", _extract_templates("person names"), "exact_match", generator=_persons),
        Task("ner_city", "extraction", _extract_templates("cities"), "exact_match", generator=_cities),
        Task("extract_numbers", "extraction", _extract_templates("numbers"), "exact_match", generator=_numbers),
        Task("extract_emails", "extraction", _extract_templates("email addresses"), "exact_match", generator=_emails),
        Task("extract_dates", "extraction", _extract_templates("dates"), "exact_match", generator=_dates),
    ]
