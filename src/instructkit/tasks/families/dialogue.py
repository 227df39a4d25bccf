"""Dialogue (cluster "dialogue"): multi-turn memory (earlier turns are real user/assistant messages), role-play with a
system persona, dialogue acts and response selection."""

from __future__ import annotations

import random

from instructkit.data.schema import Message
from instructkit.tasks.bank import Task, TaskExample, Template
from instructkit.tasks.families._common import CITIES, NAMES, OBJECTS, ex, tpl


def _recall(rng: random.Random):
    n = rng.choice(NAMES)
    city = rng.choice(CITIES)[0]
    hist = (Message("user", f"Hi! My name is {n} and I live in {city}."),
            Message("assistant", f"Nice to meet you, {n}! How can I help you today?"),
            Message("user", "Can you recommend a good book?"),
            Message("assistant", "Sure: try \"The Little Prince\", it is short and lovely."))
    if rng.random() < 0.5:
        return TaskExample({"what": "name"}, n, None, hist)
    return TaskExample({"what": "city"}, city, None, hist)


def _running_total(rng: random.Random):
    obj = rng.choice(OBJECTS)
    a, b, c = rng.randint(2, 20), rng.randint(1, 10), rng.randint(1, 10)
    hist = (Message("user", f"I have {a} {obj}."),
            Message("assistant", f"Got it, you have {a} {obj}."),
            Message("user", f"My friend gives me {b} more."),
            Message("assistant", f"Then you have {a + b} {obj}."))
    return TaskExample({"obj": obj, "c": c}, str(a + b - c), None, hist)


_PERSONAS = [
    ("You are a cheerful pirate who always speaks like a pirate.", "What is the weather like today?",
     "Arr, matey! The skies be clear and the winds be fair today!"),
    ("You are a cheerful pirate who always speaks like a pirate.", "Can you recommend a snack?",
     "Arr, a fine ship's biscuit and a bit o' cheese will keep ye sailin', matey!"),
    ("You are a polite butler who addresses the user as sir or madam.", "Can you bring me some tea?",
     "Certainly, sir or madam. Your tea will be served shortly."),
    ("You are a polite butler who addresses the user as sir or madam.", "What time is dinner?",
     "Dinner will be served at seven o'clock, sir or madam."),
    ("You are a patient maths tutor who explains step by step.", "What is 12 times 3?",
     "Let us do it step by step: 12 times 3 is 12 + 12 + 12, which is 36."),
    ("You are a patient maths tutor who explains step by step.", "What is half of 50?",
     "Step by step: half means dividing by 2, and 50 divided by 2 is 25."),
    ("You are a sports commentator who is always excited.", "Describe a cat walking across the room.",
     "And here comes the cat, gliding across the room, what poise, what elegance, unbelievable!"),
]

_ACTS = [
    ("Hello there, nice to see you!", "greeting"), ("Good morning, everyone.", "greeting"),
    ("Could you close the window, please?", "request"), ("Please send me the file.", "request"),
    ("What time does the train leave?", "question"), ("Where did you buy that jacket?", "question"),
    ("I finished the report yesterday.", "statement"), ("The sky is very clear tonight.", "statement"),
    ("Thank you so much for your help.", "thanks"), ("Thanks a lot, that was kind.", "thanks"),
    ("Goodbye, see you tomorrow.", "farewell"), ("Bye, take care!", "farewell"),
]

_RESPONSES = [
    ("Do you know where the library is?", "Yes, it is two streets down, next to the bank.",
     ("Yes, it is two streets down, next to the bank.", "I like pizza with extra cheese.", "It rained last Tuesday.")),
    ("How was your holiday?", "It was wonderful, we spent a week by the sea.",
     ("Blue is a colour.", "It was wonderful, we spent a week by the sea.", "The printer is out of paper.")),
    ("Can you help me carry these boxes?", "Of course, let me take the heavy one.",
     ("The train leaves at noon.", "My cat is three years old.", "Of course, let me take the heavy one.")),
    ("What would you like to drink?", "A glass of water, please.",
     ("A glass of water, please.", "I was born in May.", "The meeting is cancelled.")),
    ("Why are you late?", "Sorry, my bus broke down on the way.",
     ("Sorry, my bus broke down on the way.", "Elephants are very large.", "I prefer the red one.")),
]


def tasks() -> list[Task]:
    return [
        Task("recall_user_fact", "dialogue", tpl(
            "What is my {what}?", "Do you remember my {what}? Tell me.", "Remind me, what {what} did I mention?",
            "Quick check: which {what} did I tell you earlier?", "Earlier I told you my {what}. What was it?",
        ), "exact_match", generator=_recall),
        Task("running_total", "dialogue", tpl(
            "Then I eat {c}. How many {obj} do I have now?", "I give away {c}. How many {obj} are left?",
            "Now I lose {c} of them. How many {obj} remain? Answer with a number.",
            "If I then use {c}, how many {obj} will I have?", "Subtract {c}. What is my count of {obj} now?",
        ), "exact_match", generator=_running_total),
        Task("role_play", "dialogue", [
            Template(f"t{i + 1:02d}", user, "{target}", 1, system) for i, (system, user) in enumerate([
                ("{persona}", "{message}"),
                ("{persona} Stay in character.", "{message}"),
                ("Role-play. {persona} Never break character.", "{message}"),
                ("{persona}", "Stay in your role and answer: {message}"),
                ("Instructions for the assistant: {persona}", "User says: {message}"),
            ])
        ], "rouge_l", examples=[ex(r, persona=p, message=m) for p, m, r in _PERSONAS]),
        Task("dialogue_act", "dialogue", tpl(
            "What is the dialogue act of this utterance?\n\n\"{utterance}\"\n\n{options_}",
            "Utterance: {utterance}\nAct:\n{options_}",
            "{utterance}\n\nIs the sentence above a greeting, request, question, statement, thanks or farewell?\n"
            "{options_}",
            "Classify the speaker's intent: {utterance}\n{options_}",
            "In a conversation someone says \"{utterance}\". What are they doing?\n{options_}",
        ), examples=[ex(a, utterance=u) for u, a in _ACTS],
            options=("farewell", "greeting", "question", "request", "statement", "thanks")),
        Task("response_selection", "dialogue", tpl(
            "A: {context}\nB: ?\n\nWhich reply from B makes the most sense?\n{options_}",
            "Someone asks: \"{context}\" Pick the best response.\n{options_}",
            "Conversation so far: {context}\nChoose the most natural next turn.\n{options_}",
            "{context}\n\nWhat is the best answer to the question above?\n{options_}",
            "Select the reply that fits the dialogue.\nSpeaker 1: {context}\n{options_}",
        ), examples=[ex(r, opts, context=c) for c, r, opts in _RESPONSES]),
    ]

