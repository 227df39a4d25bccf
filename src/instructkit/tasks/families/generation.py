"""Open-ended writing (cluster "open_generation"), scored by ROUGE-L against one written reference: a weak signal
for open tasks (as in FLAN's generation clusters), but a signal that moves when a model learns the task's shape."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import NAMES, ex, tpl

_CONCEPTS = [
    ("photosynthesis", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and "
                       "release oxygen."),
    ("gravity", "Gravity is the force that pulls objects with mass toward each other, which is why things fall to "
                "the ground."),
    ("inflation", "Inflation is the general rise in prices over time, so the same money buys less."),
    ("a vaccine", "A vaccine trains the immune system to recognise a germ so the body can fight it off quickly "
                  "later."),
    ("recycling", "Recycling turns used materials like paper, glass and plastic into new products instead of "
                  "throwing them away."),
    ("the water cycle", "In the water cycle, water evaporates, forms clouds, falls as rain and flows back to the "
                        "sea."),
    ("a computer program", "A computer program is a list of instructions that tells a computer what to do, step "
                           "by step."),
    ("democracy", "Democracy is a system of government in which citizens choose their leaders by voting."),
]
_TIPS = [
    ("staying healthy", "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."),
    ("saving money", "1. Make a monthly budget.\n2. Cook at home more often.\n3. Avoid impulse purchases."),
    ("studying for an exam", "1. Start early.\n2. Practise with past papers.\n3. Take short breaks."),
    ("sleeping better", "1. Keep a regular bedtime.\n2. Avoid screens before bed.\n3. Keep the room dark and cool."),
    ("learning a language", "1. Practise a little every day.\n2. Speak with native speakers.\n3. Read simple books."),
    ("reducing stress", "1. Take regular walks.\n2. Breathe slowly and deeply.\n3. Talk to someone you trust."),
    ("writing an essay", "1. Plan an outline first.\n2. Write a clear thesis.\n3. Revise and proofread."),
]
_ANIMALS = [
    ("an elephant", "An elephant is a huge grey mammal with a long trunk, large ears and ivory tusks."),
    ("a penguin", "A penguin is a black and white bird that cannot fly but swims very well in cold seas."),
    ("a giraffe", "A giraffe is a very tall African mammal with a long neck and a spotted coat."),
    ("an owl", "An owl is a bird that hunts at night, with large eyes and soft, silent feathers."),
    ("a dolphin", "A dolphin is a smart, playful sea mammal that breathes air through a blowhole."),
    ("a bee", "A bee is a small flying insect that collects nectar and makes honey."),
    ("a tortoise", "A tortoise is a slow land reptile with a hard shell that can live for many decades."),
]
_PRODUCTS = ["water bottle", "backpack", "desk lamp", "notebook", "pair of running shoes", "alarm clock"]
_FEATURES = ["lightweight", "waterproof", "made from recycled materials", "available in five colours",
             "easy to clean", "built to last"]


def _product(rng: random.Random):
    p = rng.choice(_PRODUCTS)
    f1, f2 = rng.sample(_FEATURES, 2)
    return ex(f"Meet our new {p}: it is {f1} and {f2}, perfect for everyday use.", product=p, f1=f1, f2=f2)


def _email(rng: random.Random):
    a, b = rng.sample(NAMES, 2)
    day = rng.choice(["Monday", "Tuesday", "Thursday"])
    reason = rng.choice(["I am feeling unwell", "I have a family appointment", "my train is cancelled"])
    return ex(f"Dear {b},\n\nI am sorry, but I cannot attend the meeting on {day} because {reason}. "
              f"Could we reschedule?\n\nBest regards,\n{a}", sender=a, recipient=b, day=day, reason=reason)


def tasks() -> list[Task]:
    return [
        Task("explain_concept", "open_generation", tpl(
            "Explain {concept} in one sentence.", "What is {concept}? Explain it simply.",
            "Describe {concept} to a twelve-year-old.", "Give a short definition of {concept}.",
            "In plain words, what does {concept} mean?", "Write one sentence that explains {concept}.",
        ), "rouge_l", examples=[ex(r, concept=c) for c, r in _CONCEPTS]),
        Task("give_tips", "open_generation", tpl(
            "Give three tips for {topic}.", "What are three good tips for {topic}? Use a numbered list.",
            "List three pieces of advice about {topic}.", "I need help with {topic}. Give me three tips.",
            "Write a numbered list of three tips for {topic}.",
        ), "rouge_l", examples=[ex(r, topic=t) for t, r in _TIPS]),
        Task("describe_animal", "open_generation", tpl(
            "Describe {animal} in one sentence.", "What does {animal} look like? Answer in one sentence.",
            "Write a short description of {animal}.", "Tell me about {animal} in a single sentence.",
            "Give a one-sentence description of {animal} for a children's book.",
        ), "rouge_l", examples=[ex(r, animal=a) for a, r in _ANIMALS]),
        Task("product_description", "open_generation", tpl(
            "Write a one-sentence product description for a {product} that is {f1} and {f2}.",
            "Product: {product}\nFeatures: {f1}; {f2}\nWrite a short advert.",
            "Describe our new {product} ({f1}, {f2}) in one catchy sentence.",
            "Create marketing copy for a {product}. Mention that it is {f1} and {f2}.",
            "Write a sentence introducing a {product} that is {f1} and {f2}.",
        ), "rouge_l", generator=_product),
        Task("write_email", "open_generation", tpl(
            "Write a short email from {sender} to {recipient} cancelling the meeting on {day} because {reason}.",
            "{sender} must tell {recipient} that they cannot attend the {day} meeting ({reason}). Write the email.",
            "Draft a polite email. From: {sender}. To: {recipient}. Purpose: cancel the {day} meeting; reason: "
            "{reason}.",
            "Compose an email to {recipient}, signed {sender}, saying you will miss the meeting on {day} because "
            "{reason}.",
            "Help {sender} write to {recipient}: the {day} meeting must be skipped because {reason}.",
        ), "rouge_l", generator=_email),
    ]
