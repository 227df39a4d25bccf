"""Helpers shared by the task families: template builders and small word pools for generators."""

from __future__ import annotations

from typing import Iterable

from instructkit.tasks.bank import TaskExample, Template


def tpl(*instructions: str, response: str = "{target}", responses: Iterable[str] | None = None,
        system: str | None = None) -> list[Template]:
    """Templates t01, t02, ... from instruction strings (one response string for all, or one each)."""
    resp = list(responses) if responses is not None else [response] * len(instructions)
    if len(resp) != len(instructions):
        raise ValueError("one response per instruction")
    return [Template(f"t{i + 1:02d}", ins, r, 1, system) for i, (ins, r) in enumerate(zip(instructions, resp))]


def classify_templates(thing: str, question: str, field: str = "text") -> list[Template]:
    """Ten classification phrasings (FLAN's usual count) for a text field, a noun naming it and a question."""
    q_low = question[0].lower() + question[1:]
    cap = thing[0].upper() + thing[1:]
    f = "{" + field + "}"
    return tpl(
        f"{f}\n\n{question}\n\n{{options_}}",
        f"{question}\n\n{cap}: {f}\n\n{{options_}}",
        f"Read the following {thing} and answer the question.\n\n{f}\n\n{question}\n{{options_}}",
        f"{cap}: \"{f}\"\n{question}\n{{options_}}",
        f"Here is a {thing}:\n{f}\n\n{question} {{options_}}",
        f"Q: {question}\n{cap}: {f}\n{{options_}}",
        f"Consider this {thing}.\n\n{f}\n\n{question}\n\n{{options_}}",
        f"{f}\n\nBased on the {thing} above, {q_low}\n{{options_}}",
        f"Task: {question}\nInput: {f}\n{{options_}}",
        f"I just read this {thing}: {f}\n{question}\n{{options_}}",
    )


def ex(target: str, options: Iterable[str] | None = None, **inputs) -> TaskExample:
    return TaskExample(inputs=inputs, target=str(target), options=tuple(options) if options is not None else None)


NAMES = ["Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Yusuf", "Zoe"]
CITIES = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"), ("Lisbon", "Portugal"),
          ("Vienna", "Austria"), ("Oslo", "Norway"), ("Cairo", "Egypt"), ("Nairobi", "Kenya"), ("Lima", "Peru"),
          ("Ottawa", "Canada"), ("Tokyo", "Japan"), ("Seoul", "South Korea"), ("Hanoi", "Vietnam"),
          ("Canberra", "Australia"), ("Dublin", "Ireland"), ("Athens", "Greece"), ("Warsaw", "Poland"),
          ("Stockholm", "Sweden"), ("Helsinki", "Finland"), ("Prague", "Czech Republic"), ("Budapest", "Hungary"),
          ("Bangkok", "Thailand"), ("Manila", "Philippines"), ("Santiago", "Chile"), ("Bogota", "Colombia"),
          ("Accra", "Ghana"), ("Rabat", "Morocco"), ("Tehran", "Iran"), ("Ankara", "Turkey"), ("Moscow", "Russia"),
          ("Beijing", "China"), ("New Delhi", "India"), ("Jakarta", "Indonesia"), ("Mexico City", "Mexico"),
          ("Buenos Aires", "Argentina"), ("Wellington", "New Zealand"), ("Copenhagen", "Denmark"),
          ("Brussels", "Belgium"), ("Bern", "Switzerland")]
OBJECTS = ["apples", "books", "pencils", "marbles", "cookies", "stamps", "coins", "shells", "cards", "balloons"]
NOUNS = ["cat", "house", "river", "teacher", "garden", "window", "bicycle", "letter", "mountain", "song", "table",
         "bridge", "doctor", "candle", "forest", "engine", "pillow", "market", "island", "ladder"]
ADJECTIVES = ["red", "quiet", "bright", "old", "small", "happy", "cold", "heavy", "gentle", "strange"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
