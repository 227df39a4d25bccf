"""Natural language inference (cluster "nli"): three-way and two-way entailment, with generated premises whose
labels follow from how they were built (numbers, transitive comparisons, places)."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import CITIES, NAMES, OBJECTS, ex, tpl

NLI3 = ("entailment", "neutral", "contradiction")
YN = ("yes", "no")

_NLI3_TEMPLATES = tpl(
    "Premise: {premise}\nHypothesis: {hypothesis}\n\nDoes the premise entail the hypothesis?\n\n{options_}",
    "{premise}\n\nBased on the paragraph above, can we conclude that \"{hypothesis}\"?\n\n{options_}",
    "Read the premise and decide whether the hypothesis is an entailment, a contradiction or neutral.\n\n"
    "Premise: {premise}\nHypothesis: {hypothesis}\n{options_}",
    "If \"{premise}\", does it follow that \"{hypothesis}\"?\n{options_}",
    "Sentence 1: {premise}\nSentence 2: {hypothesis}\n\nWhat is the relation between sentence 1 and sentence 2?\n"
    "{options_}",
    "Here is a premise: {premise}\n\nHere is a hypothesis: {hypothesis}\n\nIs the hypothesis true, false or "
    "undetermined given the premise?\n{options_}",
    "Determine the inference relation.\n{premise} => {hypothesis}\n{options_}",
    "{premise}\nQuestion: {hypothesis} Entailment, neutral or contradiction?\n{options_}",
    "Given that {premise} Is it the case that {hypothesis}\n{options_}",
    "Classify the pair as entailment, neutral or contradiction.\nA: {premise}\nB: {hypothesis}\n{options_}",
)

_NLI2_TEMPLATES = tpl(
    "{premise}\n\nDoes this imply that \"{hypothesis}\"?\n\n{options_}",
    "Premise: {premise}\nHypothesis: {hypothesis}\nIs the hypothesis entailed by the premise?\n{options_}",
    "Read the text and answer yes or no.\n\nText: {premise}\nClaim: {hypothesis}\nIs the claim supported?\n{options_}",
    "{premise}\nQuestion: Is it true that {hypothesis_lc}\n{options_}",
    "Given the sentence \"{premise}\", can we say that \"{hypothesis}\"?\n{options_}",
    "Fact: {premise}\nStatement: {hypothesis}\nDoes the fact support the statement?\n{options_}",
    "Can you infer \"{hypothesis}\" from \"{premise}\"?\n{options_}",
    "Decide if the conclusion follows.\nContext: {premise}\nConclusion: {hypothesis}\n{options_}",
    "{premise} Therefore, {hypothesis_lc} Is that right?\n{options_}",
    "Is the following entailment valid?\n{premise} -> {hypothesis}\n{options_}",
)

_FIXED = [
    ("A man is playing a guitar on stage.", "A man is performing music.", "entailment"),
    ("A man is playing a guitar on stage.", "The man is asleep in bed.", "contradiction"),
    ("A man is playing a guitar on stage.", "The man is a famous musician.", "neutral"),
    ("Two children are building a sandcastle on the beach.", "Kids are playing outside.", "entailment"),
    ("Two children are building a sandcastle on the beach.", "The children are in a classroom.", "contradiction"),
    ("Two children are building a sandcastle on the beach.", "The children are siblings.", "neutral"),
    ("A woman is cutting vegetables in the kitchen.", "Someone is preparing food.", "entailment"),
    ("A woman is cutting vegetables in the kitchen.", "The woman is swimming.", "contradiction"),
    ("A woman is cutting vegetables in the kitchen.", "She is cooking dinner for guests.", "neutral"),
    ("The old bridge was closed after the storm.", "The bridge cannot be used.", "entailment"),
    ("The old bridge was closed after the storm.", "The bridge was opened after the storm.", "contradiction"),
    ("The old bridge was closed after the storm.", "The bridge will be repaired next month.", "neutral"),
]


def _numbers(rng: random.Random):
    name, obj, n = rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(3, 20)
    kind = rng.choice(NLI3)
    if kind == "entailment":
        hyp = f"{name} has more than {rng.randint(1, n - 1)} {obj}."
    elif kind == "contradiction":
        hyp = f"{name} has fewer than {rng.randint(1, n)} {obj}."
    else:
        hyp = f"{name} bought the {obj} yesterday."
    return ex(kind, premise=f"{name} has exactly {n} {obj}.", hypothesis=hyp)


def _transitive(rng: random.Random):
    a, b, c, d = rng.sample(NAMES, 4)
    adj = rng.choice(["taller", "older", "faster", "richer"])
    premise = f"{a} is {adj} than {b}. {b} is {adj} than {c}."
    kind = rng.choice(YN)
    hyp = f"{a} is {adj} than {c}." if kind == "yes" else rng.choice(
        [f"{c} is {adj} than {a}.", f"{c} is {adj} than {b}."])
    return ex(kind, premise=premise, hypothesis=hyp, hypothesis_lc=hyp)  # names stay capitalised


def _places(rng: random.Random):
    name = rng.choice(NAMES)
    (city, country), (_, other) = rng.sample(CITIES, 2)
    kind = rng.choice(YN)
    hyp = f"{name} lives in {country if kind == 'yes' else other}."
    return ex(kind, premise=f"{name} lives in {city}, which is in {country}.", hypothesis=hyp, hypothesis_lc=hyp)


_FIXED2 = [(p, h, "yes" if lbl == "entailment" else "no") for p, h, lbl in _FIXED if lbl != "neutral"]


def tasks() -> list[Task]:
    return [
        Task("nli_everyday", "nli", _NLI3_TEMPLATES,
             examples=[ex(lbl, premise=p, hypothesis=h) for p, h, lbl in _FIXED], options=NLI3,
             description="three-way NLI on everyday scenes (SNLI style)"),
        Task("nli_quantities", "nli", _NLI3_TEMPLATES, generator=_numbers, options=NLI3),
        Task("nli_transitive", "nli", _NLI2_TEMPLATES, generator=_transitive, options=YN),
        Task("nli_places", "nli", _NLI2_TEMPLATES, generator=_places, options=YN),
        Task("rte_everyday", "nli", _NLI2_TEMPLATES,
             examples=[ex(lbl, premise=p, hypothesis=h, hypothesis_lc=h[0].lower() + h[1:]) for p, h, lbl in _FIXED2], options=YN),
    ]
