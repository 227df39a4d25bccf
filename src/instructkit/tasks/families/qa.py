"""Question answering (cluster "closed_qa"): closed-book facts, extractive QA and yes/no questions over a generated
context, and multiple choice."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import CITIES, NAMES, OBJECTS, ex, tpl

YN = ("yes", "no")

_CONTEXT_QA = tpl(
    "Answer the question using the context.\n\nContext: {context}\n\nQuestion: {question}",
    "{context}\n\n{question}",
    "Read the passage and answer.\n{context}\nQ: {question}\nA:",
    "Context: {context}\nQuestion: {question}\nAnswer with a short phrase taken from the context.",
    "Here is some information: {context}\n\nUsing only this information, {question_lc}",
    "Question: {question}\nUse this text to answer it: {context}",
    "Given the facts below, answer the question.\nFacts: {context}\n{question}",
    "{question}\nThe answer is in this paragraph: {context}",
    "Passage:\n{context}\n\nBased on the passage, answer: {question}",
    "I will give you a context and a question. Context: {context} Question: {question}",
)


def _context(rng: random.Random):
    a, b = rng.sample(NAMES, 2)
    (city, _), (city2, _) = rng.sample(CITIES, 2)
    age, n = rng.randint(8, 80), rng.randint(2, 40)
    obj = rng.choice(OBJECTS)
    context = (f"{a} is {age} years old and lives in {city}. {b} lives in {city2} and collects {obj}; "
               f"{b} has {n} of them.")
    kind = rng.randrange(4)
    q, t = [(f"How old is {a}?", str(age)), (f"Where does {a} live?", city), (f"Where does {b} live?", city2),
            (f"How many {obj} does {b} have?", str(n))][kind]
    return ex(t, context=context, question=q, question_lc=q[0].lower() + q[1:])


def _boolq(rng: random.Random):
    a = rng.choice(NAMES)
    (city, country), (_, other) = rng.sample(CITIES, 2)
    age = rng.randint(8, 80)
    context = f"{a} was born in {city}, {country}, and is {age} years old."
    kind = rng.randrange(4)
    q, t = [(f"Was {a} born in {country}?", "yes"), (f"Was {a} born in {other}?", "no"),
            (f"Is {a} older than {age - 3}?", "yes"), (f"Is {a} older than {age + 5}?", "no")][kind]
    return ex(t, context=context, question=q, question_lc=q[0].lower() + q[1:])


_MC = [
    ("Which planet is closest to the Sun?", ("Mercury", "Venus", "Earth", "Mars"), "Mercury"),
    ("What gas do plants absorb from the air?", ("oxygen", "carbon dioxide", "nitrogen", "helium"), "carbon dioxide"),
    ("At what temperature does water freeze in degrees Celsius?", ("0", "10", "32", "100"), "0"),
    ("Which animal is a mammal?", ("shark", "frog", "dolphin", "eagle"), "dolphin"),
    ("What is the largest ocean on Earth?", ("Atlantic", "Indian", "Arctic", "Pacific"), "Pacific"),
    ("How many legs does a spider have?", ("six", "eight", "ten", "four"), "eight"),
    ("What force pulls objects toward the Earth?", ("magnetism", "friction", "gravity", "tension"), "gravity"),
    ("Which organ pumps blood through the body?", ("lungs", "heart", "liver", "kidney"), "heart"),
    ("What is the chemical symbol for gold?", ("Au", "Ag", "Gd", "Go"), "Au"),
    ("Which of these is a renewable energy source?", ("coal", "oil", "wind", "natural gas"), "wind"),
    ("How many continents are there?", ("five", "six", "seven", "eight"), "seven"),
    ("What do bees make?", ("milk", "honey", "silk", "wax paper"), "honey"),
]

_ANTONYMS = [("hot", "cold"), ("big", "small"), ("early", "late"), ("happy", "sad"), ("open", "closed"),
             ("light", "dark"), ("fast", "slow"), ("up", "down"), ("full", "empty"), ("old", "young"),
             ("strong", "weak"), ("rich", "poor"), ("high", "low"), ("hard", "soft"), ("wet", "dry"),
             ("loud", "quiet"), ("first", "last"), ("true", "false"), ("win", "lose"), ("buy", "sell")]


def tasks() -> list[Task]:
    return [
        Task("capital_cities", "closed_qa", tpl(
            "What is the capital of {country}?", "Name the capital city of {country}.",
            "Q: What is the capital of {country}?\nA:", "{country}'s capital is which city?",
            "Which city is the capital of {country}? Answer with the city name only.",
            "Tell me the capital of {country}.", "Country: {country}\nCapital:",
            "I am travelling to the capital of {country}. Which city is that?",
            "Answer briefly: capital of {country}?", "What city serves as the capital of {country}?",
        ), "exact_match", examples=[ex(c, country=k) for c, k in CITIES]),
        Task("context_qa", "closed_qa", _CONTEXT_QA, "exact_match", generator=_context),
        Task("boolq_context", "closed_qa", tpl(
            "{context}\n\nQuestion: {question}\n{options_}",
            "Read the text and answer yes or no.\n{context}\n{question}\n{options_}",
            "Context: {context}\nBased on the context, {question_lc}\n{options_}",
            "{question} Use this fact: {context}\n{options_}",
            "Passage: {context}\nQ: {question}\n{options_}",
            "Given that {context} {question}\n{options_}",
        ), generator=_boolq, options=YN),
        Task("science_multiple_choice", "closed_qa", tpl(
            "{question}\n\n{options_}",
            "Answer the multiple-choice question.\n{question}\n{options_}",
            "Question: {question}\nPick the correct answer.\n{options_}",
            "Choose the right option. {question}\n{options_}",
            "Science quiz: {question}\n{options_}",
            "{question} Choose from the options below.\n{options_}",
        ), examples=[ex(a, opts, question=q) for q, opts, a in _MC]),
        Task("antonyms", "closed_qa", tpl(
            "What is the opposite of \"{word}\"?", "Give an antonym for the word {word}.", "Word: {word}\nAntonym:",
            "Which word means the opposite of {word}?", "Write one word that is the opposite of \"{word}\".",
        ), "exact_match", examples=[ex(b, word=a) for a, b in _ANTONYMS] + [ex(a, word=b) for a, b in _ANTONYMS]),
    ]
