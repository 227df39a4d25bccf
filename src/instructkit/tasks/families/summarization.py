"""Summaries and headlines (cluster "summarization"), scored by ROUGE-L against a reference. Two small written sets
and two generators whose reference follows from the facts they put in the text."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import CITIES, NAMES, OBJECTS, ex, tpl

_ARTICLES = [
    ("The city council approved a plan on Tuesday to add 40 kilometres of protected bike lanes over the next three "
     "years. Officials said the lanes will connect the main train stations with the university and the hospital.",
     "Council approves 40 km of protected bike lanes", "The city council approved a three-year plan to build 40 "
     "kilometres of protected bike lanes linking stations, the university and the hospital."),
    ("Heavy rain caused the river to overflow on Sunday night, flooding dozens of homes in the lower town. No one was "
     "hurt, and volunteers spent Monday clearing mud from the streets.",
     "River floods dozens of homes after heavy rain", "Heavy rain flooded dozens of homes in the lower town, but no "
     "one was hurt and volunteers helped clean up."),
    ("The local bakery, open since 1952, will close at the end of the month because the owners are retiring. "
     "Regular customers have started a petition asking someone to take it over.",
     "Beloved bakery to close as owners retire", "A bakery open since 1952 is closing because its owners are "
     "retiring, and customers hope someone will take it over."),
    ("Scientists have trained a small robot to sort recycling by touch. In tests, it correctly separated plastic, "
     "paper and metal nine times out of ten.",
     "Robot learns to sort recycling by touch", "Scientists built a robot that sorts plastic, paper and metal by "
     "touch, succeeding nine times out of ten."),
    ("The school will start classes thirty minutes later from September after a study found students slept better "
     "and scored higher on tests with a later start.",
     "School moves start time later to help students sleep", "Because a study linked later starts to better sleep "
     "and grades, the school will begin classes thirty minutes later from September."),
    ("A lost dog walked nearly 60 kilometres back to its old home after its family moved to a new town. The family "
     "found it waiting on the porch three days later.",
     "Lost dog walks 60 km back to old home", "After its family moved, a dog walked almost 60 kilometres to its old "
     "home, where it was found three days later."),
    ("The museum reopened after two years of renovation with a new glass roof and a gallery for children. Entry will "
     "be free for the first week.",
     "Museum reopens with glass roof and children's gallery", "The museum reopened after a two-year renovation with "
     "a glass roof and a children's gallery, free for the first week."),
    ("Farmers in the valley reported their best apple harvest in a decade thanks to a mild spring and steady rain "
     "during the summer.",
     "Valley farmers report best apple harvest in a decade", "A mild spring and steady summer rain gave valley "
     "farmers their best apple harvest in ten years."),
]


def _meeting(rng: random.Random):
    people = rng.sample(NAMES, 3)
    topic = rng.choice(["the budget", "the product launch", "the office move", "the hiring plan"])
    day = rng.choice(["Monday", "Wednesday", "Friday"])
    decision = rng.choice(["postpone it by a month", "approve it", "ask for more data", "split it into two phases"])
    notes = (f"Attendees: {', '.join(people)}. {people[0]} opened the meeting about {topic}. {people[1]} raised "
             f"concerns about cost. {people[2]} proposed a compromise. After discussion the group agreed to {decision}. "
             f"Next meeting: {day}.")
    return ex(f"The team discussed {topic} and agreed to {decision}; they meet again on {day}.", notes=notes)


def _sales(rng: random.Random):
    people = rng.sample(NAMES, 3)
    obj = rng.choice(OBJECTS)
    counts = rng.sample(range(2, 30), 3)
    text = " ".join(f"{p} sold {c} {obj}." for p, c in zip(people, counts))
    best = people[counts.index(max(counts))]
    return ex(f"{best} sold the most {obj}, {max(counts)} of {sum(counts)} in total.", report=text)


def _trip(rng: random.Random):
    n = rng.choice(NAMES)
    (c1, k1), (c2, k2) = rng.sample(CITIES, 2)
    days = rng.randint(3, 14)
    text = (f"{n} left {c1} on a Monday morning. The flight was delayed by an hour. After landing in {c2}, {n} spent "
            f"{days} days visiting museums and markets, then returned home to {k1}.")
    return ex(f"{n} travelled from {c1} to {c2} in {k2} for {days} days.", story=text)


_HEADLINE = tpl(
    "Write a headline for this article.\n\n{article}",
    "{article}\n\nWhat is a good title for the article above?",
    "Give this news story a short headline:\n{article}",
    "Article: {article}\nHeadline:",
    "Summarise the following article as a newspaper headline.\n{article}",
    "Come up with a title for this text: {article}",
)
_SUMMARY = tpl(
    "Summarise the article in one sentence.\n\n{article}",
    "{article}\n\nTL;DR:",
    "Write a one-sentence summary of this text.\n{article}",
    "What is the main point of the following passage? Answer in one sentence.\n\n{article}",
    "Briefly summarise:\n{article}",
    "Condense this article into a single sentence: {article}",
    "Article: {article}\nSummary:",
)


def tasks() -> list[Task]:
    return [
        Task("news_headline", "summarization", _HEADLINE, "rouge_l",
             examples=[ex(h, article=a) for a, h, _ in _ARTICLES]),
        Task("news_summary", "summarization", _SUMMARY, "rouge_l",
             examples=[ex(s, article=a) for a, _, s in _ARTICLES]),
        Task("meeting_summary", "summarization", tpl(
            "Summarise these meeting notes in one sentence.\n\n{notes}",
            "{notes}\n\nWhat was decided? Give a one-sentence summary.",
            "Meeting notes:\n{notes}\n\nSummary:",
            "Write a short summary of the meeting below.\n{notes}",
            "Read the notes and summarise the outcome: {notes}",
        ), "rouge_l", generator=_meeting),
        Task("sales_summary", "summarization", tpl(
            "Summarise the sales report in one sentence, naming the top seller and the total.\n\n{report}",
            "{report}\n\nWho sold the most, and how many were sold in total? Answer in one sentence.",
            "Sales report: {report}\nOne-line summary:",
            "Write a one-sentence summary of these sales figures: {report}",
            "Read the report and summarise it briefly.\n{report}",
        ), "rouge_l", generator=_sales),
        Task("trip_summary", "summarization", tpl(
            "Summarise the story in one sentence.\n\n{story}",
            "{story}\n\nTL;DR:",
            "Story: {story}\nSummary:",
            "In one sentence, where did the traveller go and for how long?\n{story}",
            "Write a short summary of this trip: {story}",
        ), "rouge_l", generator=_trip),
    ]
