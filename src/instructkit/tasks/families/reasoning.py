"""Reasoning: arithmetic (cluster "arithmetic") and logic, ordering, counting and dates (cluster "logic"). Every
example is generated with its exact answer (computed here, with the standard library's datetime for dates)."""

from __future__ import annotations

import datetime

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import NAMES, NOUNS, OBJECTS, WEEKDAYS, ex, tpl

YN = ("yes", "no")


def _arith_templates(sym: str, verb: str) -> list:
    return tpl(
        f"What is {{a}} {sym} {{b}}?", f"Compute {{a}} {sym} {{b}}.", f"{{a}} {sym} {{b}} =",
        f"Calculate the result of {verb} {{a}} and {{b}}.", f"Q: {{a}} {sym} {{b}}\nA:",
        f"Please work out {{a}} {sym} {{b}} and give only the number.", f"Solve: {{a}} {sym} {{b}}",
        f"What do you get by {verb} {{a}} and {{b}}?", f"Evaluate the expression {{a}} {sym} {{b}}.",
        f"Math problem: {{a}} {sym} {{b}}. Answer with a number.",
    )


def _add(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return ex(a + b, a=a, b=b)


def _sub(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return ex(a - b, a=a, b=b)


def _mul(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 20)
    return ex(a * b, a=a, b=b)


def _word_problem(rng):
    n, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b, c = rng.randint(5, 40), rng.randint(1, 20), rng.randint(1, 5)
    problem = f"{n} has {a} {obj}. {n} buys {b} more and then gives away {c}. How many {obj} does {n} have now?"
    return ex(a + b - c, problem=problem)


def _compare(rng):
    a, b = rng.sample(range(-500, 1000), 2)
    return ex(max(a, b), (str(a), str(b)), a=a, b=b)


def _parity(rng):
    a = rng.randint(0, 10_000)
    return ex("even" if a % 2 == 0 else "odd", a=a)


def _sort_numbers(rng):
    xs = rng.sample(range(0, 100), rng.randint(3, 6))
    return ex(", ".join(map(str, sorted(xs))), numbers=", ".join(map(str, xs)))


def _sort_words(rng):
    ws = rng.sample(NOUNS, rng.randint(3, 6))
    return ex(", ".join(sorted(ws)), words=", ".join(ws))


def _count_letter(rng):
    w = rng.choice(["banana", "mississippi", "committee", "bookkeeper", "strawberry", "parallel", "assessment",
                    "balloon", "coconut", "referee", "successful", "letter"])
    letter = rng.choice(sorted(set(w)))
    return ex(w.count(letter), word=w, letter=letter)


def _weekday(rng):
    d, k = rng.randrange(7), rng.randint(1, 30)
    return ex(WEEKDAYS[(d + k) % 7], day=WEEKDAYS[d], k=k)


def _add_days(rng):
    start = datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randrange(3000))
    k = rng.randint(1, 60)
    return ex((start + datetime.timedelta(days=k)).isoformat(), date=start.isoformat(), k=k)


def _days_between(rng):
    a = datetime.date(2021, 1, 1) + datetime.timedelta(days=rng.randrange(1500))
    b = a + datetime.timedelta(days=rng.randint(1, 120))
    return ex((b - a).days, start=a.isoformat(), end=b.isoformat())


def _syllogism(rng):
    cat, sup, prop = rng.choice([("sparrows", "birds", "have feathers"), ("roses", "flowers", "need water"),
                                 ("oaks", "trees", "have roots"), ("salmon", "fish", "live in water"),
                                 ("violins", "instruments", "make sound")])
    n = rng.choice(NAMES)
    if rng.random() < 0.5:
        return ex("yes", premises=f"All {sup} {prop}. All {cat} are {sup}.", conclusion=f"All {cat} {prop}.")
    return ex("no", premises=f"All {cat} are {sup}. {n} owns some {sup}.", conclusion=f"{n} owns some {cat}.")


def _tallest(rng):
    people = rng.sample(NAMES, 3)
    # people[0] > people[1] > people[2]; statements shuffled so the order must be inferred
    facts = [f"{people[0]} is taller than {people[1]}.", f"{people[1]} is taller than {people[2]}."]
    rng.shuffle(facts)
    opts = sorted(people)
    if rng.random() < 0.5:
        return ex(people[0], opts, facts=" ".join(facts), question="Who is the tallest?")
    return ex(people[2], opts, facts=" ".join(facts), question="Who is the shortest?")


def tasks() -> list[Task]:
    return [
        Task("addition", "arithmetic", _arith_templates("+", "adding"), "exact_match", generator=_add),
        Task("subtraction", "arithmetic", _arith_templates("-", "subtracting"), "exact_match", generator=_sub),
        Task("multiplication", "arithmetic", _arith_templates("*", "multiplying"), "exact_match", generator=_mul),
        Task("word_problem", "arithmetic", tpl(
            "{problem}", "Solve the word problem and answer with a number.\n{problem}",
            "Q: {problem}\nA:", "{problem} Give only the final number.", "Math word problem: {problem}",
            "Read carefully and answer: {problem}",
        ), "exact_match", generator=_word_problem),
        Task("larger_number", "arithmetic", tpl(
            "Which is larger, {a} or {b}?\n{options_}", "Pick the bigger number: {a}, {b}\n{options_}",
            "Compare {a} and {b}. Which one is greater?\n{options_}", "What is the maximum of {a} and {b}?\n{options_}",
            "Of the two numbers {a} and {b}, which is higher?\n{options_}",
        ), generator=_compare),
        Task("even_or_odd", "arithmetic", tpl(
            "Is {a} even or odd?\n{options_}", "Number: {a}\nParity:\n{options_}",
            "Tell me whether {a} is an even or an odd number.\n{options_}", "{a}: even or odd?\n{options_}",
            "Is the number {a} divisible by 2? Answer even or odd.\n{options_}",
        ), generator=_parity, options=("even", "odd")),
        Task("sort_numbers", "logic", tpl(
            "Sort these numbers in ascending order: {numbers}", "Arrange from smallest to largest: {numbers}",
            "{numbers}\n\nSort the numbers above from low to high, separated by commas.",
            "Numbers: {numbers}\nSorted:", "Put these numbers in increasing order: {numbers}",
        ), "exact_match", generator=_sort_numbers),
        Task("sort_words", "logic", tpl(
            "Sort these words alphabetically: {words}", "Put the words in alphabetical order: {words}",
            "{words}\n\nList the words above in dictionary order, separated by commas.",
            "Words: {words}\nAlphabetical:", "Alphabetise: {words}",
        ), "exact_match", generator=_sort_words),
        Task("count_letter", "logic", tpl(
            "How many times does the letter \"{letter}\" appear in \"{word}\"?",
            "Count the letter {letter} in the word {word}.", "Word: {word}\nLetter: {letter}\nCount:",
            "In the word \"{word}\", how many {letter}'s are there?", "Number of '{letter}' in '{word}'?",
        ), "exact_match", generator=_count_letter),
        Task("weekday_after", "logic", tpl(
            "Today is {day}. What day of the week will it be in {k} days?",
            "If it is {day} now, which weekday is {k} days later?", "{day} + {k} days = ?",
            "What day of the week comes {k} days after {day}?", "Start: {day}. Add {k} days. Weekday:",
        ), "exact_match", generator=_weekday),
        Task("date_add", "logic", tpl(
            "What date is {k} days after {date}? Answer in YYYY-MM-DD format.",
            "Add {k} days to {date} (format YYYY-MM-DD).", "Start date: {date}\nDays to add: {k}\nResult:",
            "If today is {date}, what is the date in {k} days? Use ISO format.",
            "Compute the date {k} days after {date}.",
        ), "exact_match", generator=_add_days),
        Task("days_between", "logic", tpl(
            "How many days are there from {start} to {end}?", "Count the days between {start} and {end}.",
            "Start: {start}\nEnd: {end}\nNumber of days:", "What is the number of days from {start} until {end}?",
            "If a trip starts on {start} and ends on {end}, how many days long is it (end minus start)?",
        ), "exact_match", generator=_days_between),
        Task("syllogism", "logic", tpl(
            "{premises}\nDoes it follow that {conclusion}\n{options_}",
            "Premises: {premises}\nConclusion: {conclusion}\nIs the conclusion valid?\n{options_}",
            "Assume that {premises} Must it be true that {conclusion}\n{options_}",
            "Logic check. {premises} Therefore: {conclusion} Valid?\n{options_}",
            "Given: {premises}\nCan we conclude: {conclusion}\n{options_}",
        ), generator=_syllogism, options=YN),
        Task("height_ordering", "logic", tpl(
            "{facts} {question}\n{options_}", "Facts: {facts}\nQuestion: {question}\n{options_}",
            "Read the statements and answer. {facts}\n{question}\n{options_}",
            "{question} Use these facts: {facts}\n{options_}", "Puzzle: {facts} {question}\n{options_}",
        ), generator=_tallest),
    ]
