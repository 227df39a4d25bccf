"""Paraphrase identification and rewriting (cluster "paraphrase"). The rewriting tasks are deterministic string
transformations (case, word order, voice, number, tense), so their answers are exact."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import ADJECTIVES, NAMES, NOUNS, ex, tpl

YN = ("yes", "no")

_PAIRS = [
    ("The meeting was moved to Friday.", "The meeting has been rescheduled for Friday.", "yes"),
    ("She bought a new car last week.", "Last week she purchased a new car.", "yes"),
    ("The shop closes at six.", "The shop opens at six.", "no"),
    ("He forgot his keys at home.", "He left his keys at home by mistake.", "yes"),
    ("The film was boring.", "The film was exciting.", "no"),
    ("It rained all day in the city.", "The city had rain the whole day.", "yes"),
    ("The company hired ten new engineers.", "The company fired ten engineers.", "no"),
    ("My brother lives in Oslo.", "My sister lives in Oslo.", "no"),
    ("The children finished their homework early.", "The kids completed their homework ahead of time.", "yes"),
    ("Prices rose sharply in March.", "In March, prices increased steeply.", "yes"),
    ("The train was late again.", "The train arrived early.", "no"),
    ("We need more chairs for the party.", "The party requires additional chairs.", "yes"),
]

_VERBS = [("paint", "painted"), ("clean", "cleaned"), ("repair", "repaired"), ("open", "opened"),
          ("wash", "washed"), ("deliver", "delivered"), ("lock", "locked"), ("move", "moved")]
_PLURALS = [("cat", "cats"), ("box", "boxes"), ("city", "cities"), ("child", "children"), ("mouse", "mice"),
            ("leaf", "leaves"), ("knife", "knives"), ("tomato", "tomatoes"), ("person", "people"), ("tooth", "teeth"),
            ("bus", "buses"), ("baby", "babies"), ("sheep", "sheep"), ("foot", "feet"), ("wolf", "wolves"),
            ("church", "churches"), ("goose", "geese"), ("day", "days"), ("woman", "women"), ("hero", "heroes")]
_PAST = [("walk", "walked"), ("go", "went"), ("eat", "ate"), ("write", "wrote"), ("see", "saw"), ("play", "played"),
         ("buy", "bought"), ("run", "ran"), ("read", "read"), ("bring", "brought"), ("think", "thought"),
         ("swim", "swam"), ("cook", "cooked"), ("speak", "spoke"), ("find", "found")]


def _sentence(rng: random.Random) -> str:
    return f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} is next to the {rng.choice(NOUNS)}"


def _upper(rng):
    s = _sentence(rng) + "."
    return ex(s.upper(), sentence=s)


def _lower(rng):
    s = _sentence(rng).upper() + "!"
    return ex(s.lower(), sentence=s)


def _reverse(rng):
    words = _sentence(rng).split()
    return ex(" ".join(reversed(words)), sentence=" ".join(words))


def _passive(rng):
    n = rng.choice(NAMES)
    verb, past = rng.choice(_VERBS)
    obj = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return ex(f"The {obj} was {past} by {n}.", sentence=f"{n} {past} the {obj}.")


def _plural(rng):
    s, p = rng.choice(_PLURALS)
    return ex(p, word=s)


def _past(rng):
    n = rng.choice(NAMES)
    base, past = rng.choice(_PAST)
    tail = rng.choice(["every morning", "with friends", "at home", "in the park"])
    return ex(f"{n} {past} {tail}.", sentence=f"{n} will {base} {tail}.")


_REWRITE = ("Rewrite the sentence {how}.\n\n{sentence}", "{sentence}\n\nRewrite this {how}.",
            "Sentence: {sentence}\nRewritten {how}:", "Please rewrite the following text {how}: {sentence}",
            "Change this sentence so that it is written {how}.\n{sentence}",
            "Transform the input {how}.\nInput: {sentence}\nOutput:")


def _rewrite(how: str):
    return tpl(*(t.replace("{how}", how) for t in _REWRITE))


def tasks() -> list[Task]:
    return [
        Task("paraphrase_identification", "paraphrase", tpl(
            "Sentence 1: {s1}\nSentence 2: {s2}\n\nDo these two sentences mean the same thing?\n\n{options_}",
            "\"{s1}\" and \"{s2}\"\n\nAre these two sentences paraphrases of each other?\n{options_}",
            "Is the second sentence a paraphrase of the first?\n{s1}\n{s2}\n{options_}",
            "{s1}\n{s2}\n\nDo the sentences above have the same meaning?\n{options_}",
            "Check whether the two sentences say the same thing.\nA: {s1}\nB: {s2}\n{options_}",
            "Does \"{s2}\" express the same idea as \"{s1}\"?\n{options_}",
            "Here are two sentences:\n{s1}\n{s2}\nAre they equivalent in meaning?\n{options_}",
            "Paraphrase or not?\nFirst: {s1}\nSecond: {s2}\n{options_}",
            "Would you say that \"{s1}\" and \"{s2}\" mean the same?\n{options_}",
            "Determine if these sentences are semantically equivalent.\n1. {s1}\n2. {s2}\n{options_}",
        ), examples=[ex(lbl, s1=a, s2=b) for a, b, lbl in _PAIRS], options=YN),
        Task("rewrite_uppercase", "paraphrase", _rewrite("in all capital letters"), "exact_match", generator=_upper),
        Task("rewrite_lowercase", "paraphrase", _rewrite("in lowercase letters only"), "exact_match", generator=_lower),
        Task("reverse_words", "paraphrase", _rewrite("with its words in reverse order"), "exact_match",
             generator=_reverse),
        Task("passive_voice", "paraphrase", _rewrite("in the passive voice"), "exact_match", generator=_passive),
        Task("past_tense", "paraphrase", _rewrite("in the past tense"), "exact_match", generator=_past),
        Task("pluralize", "paraphrase", tpl(
            "What is the plural of \"{word}\"?", "Give the plural form of the word: {word}", "Singular: {word}\nPlural:",
            "Write the word \"{word}\" in the plural.", "Pluralise this noun: {word}",
            "{word} -> plural?",
        ), "exact_match", generator=_plural),
    ]
