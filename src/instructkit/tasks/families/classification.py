"""Classification families: sentiment and emotion (cluster "sentiment"); topic, spam, formality, question type and
language identification (cluster "classification"). Labels come from how the generators build each text, so they are
exact."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import NAMES, classify_templates, ex

_MOVIE = [
    ("A moving, beautifully acted film that stayed with me for days.", "positive"),
    ("The plot was a mess and the jokes fell flat.", "negative"),
    ("One of the most charming comedies of the year.", "positive"),
    ("I checked my watch every ten minutes; it dragged on forever.", "negative"),
    ("The soundtrack is gorgeous and the cast is superb.", "positive"),
    ("Wooden dialogue, lazy writing and a predictable ending.", "negative"),
    ("A clever, funny and surprisingly tender story.", "positive"),
    ("Even the talented lead cannot save this dull script.", "negative"),
    ("The director delivers a thrilling, confident debut.", "positive"),
    ("It is loud, long and completely forgettable.", "negative"),
    ("A warm, witty film that the whole family will enjoy.", "positive"),
    ("The special effects look cheap and the story makes no sense.", "negative"),
    ("Every scene is crafted with care; a small masterpiece.", "positive"),
    ("I wanted to leave halfway through.", "negative"),
    ("Smart, stylish and full of heart.", "positive"),
    ("A tedious sequel that nobody asked for.", "negative"),
]

_PRODUCTS = ["blender", "backpack", "phone case", "desk lamp", "kettle", "pair of headphones", "coffee grinder",
             "umbrella", "keyboard", "water bottle"]
_POS = ["works perfectly", "is sturdy and well made", "exceeded my expectations", "was worth every penny",
        "arrived quickly and works great", "is the best I have owned"]
_NEG = ["broke after two days", "is flimsy and cheap", "stopped working within a week", "was a waste of money",
        "arrived damaged", "is much worse than described"]
_NEU = ["arrived on Tuesday", "comes in a blue box", "is about twenty centimetres long", "was delivered by courier",
        "is available in three colours", "has a one-year warranty"]


def _product(rng: random.Random):
    label = rng.choice(["positive", "negative"])
    phrase = rng.choice(_POS if label == "positive" else _NEG)
    return ex(label, review=f"This {rng.choice(_PRODUCTS)} {phrase}.")


def _tweet(rng: random.Random):
    label = rng.choice(["positive", "negative", "neutral"])
    pool = {"positive": _POS, "negative": _NEG, "neutral": _NEU}[label]
    return ex(label, tweet=f"My new {rng.choice(_PRODUCTS)} {rng.choice(pool)}.")


_EMOTION = {
    "joy": ["I just got the job I always wanted!", "We won the final and everyone is cheering.",
            "My best friend surprised me with a visit today."],
    "sadness": ["I miss my grandmother so much since she passed away.", "Nobody came to my birthday party.",
                "Our old dog died last night."],
    "anger": ["They cancelled my flight again without any explanation!", "Someone scratched my car and drove off.",
              "I was lied to by my own manager."],
    "fear": ["I hear footsteps downstairs and I am home alone.", "The exam results come out tomorrow and I am terrified.",
             "The plane started shaking violently."],
}


def _emotion(rng: random.Random):
    label = rng.choice(sorted(_EMOTION))
    return ex(label, text=rng.choice(_EMOTION[label]))


_TOPICS = {
    "sports": ["{n} scored twice as the home team won the cup final.", "The marathon in {c} drew a record field.",
               "{n} signed a three-year contract with the club."],
    "business": ["Shares of the {c} bank rose after strong quarterly profits.",
                 "{n} was named chief executive of the retailer.", "The merger creates the largest airline in {c}."],
    "science": ["Researchers in {c} discovered a new species of frog.", "{n} published a study on black holes.",
                "A new telescope in {c} captured images of a distant galaxy."],
    "world": ["Leaders met in {c} to discuss the peace agreement.", "Floods forced thousands to leave their homes near {c}.",
              "{n} was elected president after a close vote."],
}


def _topic(rng: random.Random):
    label = rng.choice(sorted(_TOPICS))
    city = rng.choice(["Oslo", "Lima", "Cairo", "Seoul", "Dublin", "Accra"])
    return ex(label, article=rng.choice(_TOPICS[label]).format(n=rng.choice(NAMES), c=city))


def _spam(rng: random.Random):
    if rng.random() < 0.5:
        body = rng.choice(["Congratulations! You won a free cruise. Click here to claim now!!!",
                           "Earn $5000 a week from home, no experience needed. Reply YES.",
                           "URGENT: your account is locked, send your password to unlock it.",
                           "Cheap watches 90% off, limited offer, buy now!"])
        return ex("spam", message=body)
    n = rng.choice(NAMES)
    body = rng.choice([f"Hi {n}, are we still meeting for lunch on Friday?",
                       f"{n}, the slides for tomorrow's meeting are attached.",
                       f"Thanks for the book, {n}. I will return it next week.",
                       f"Reminder: the team call moved to 3 pm, {n}."])
    return ex("not spam", message=body)


_FORMALITY = [
    ("I would be grateful if you could send the report at your earliest convenience.", "formal"),
    ("hey can u send me that report asap", "informal"),
    ("We regret to inform you that the position has been filled.", "formal"),
    ("lol that party was wild", "informal"),
    ("Please find enclosed the documents you requested.", "formal"),
    ("gonna be late, traffic is crazy", "informal"),
    ("Kindly confirm your attendance by Monday.", "formal"),
    ("dude, that's awesome!!", "informal"),
    ("The committee will convene at nine o'clock.", "formal"),
    ("wanna grab pizza later?", "informal"),
]


def _qtype(rng: random.Random):
    kind = rng.choice(["person", "place", "number", "date"])
    q = {
        "person": rng.choice(["Who wrote the letter to {n}?", "Who is the manager of the shop?", "Who invited {n}?"]),
        "place": rng.choice(["Where does {n} live?", "Where is the nearest station?", "Where did {n} park the car?"]),
        "number": rng.choice(["How many books does {n} own?", "How many people came to the meeting?",
                              "How many floors does the building have?"]),
        "date": rng.choice(["When was {n} born?", "When does the shop open?", "On what day is the exam?"]),
    }[kind]
    return ex(kind, question=q.format(n=rng.choice(NAMES)))


_LANG = [
    ("The weather is nice today.", "English"), ("Where is the train station?", "English"),
    ("Il fait beau aujourd'hui.", "French"), ("Où est la gare ?", "French"),
    ("Hace buen tiempo hoy.", "Spanish"), ("¿Dónde está la estación de tren?", "Spanish"),
    ("Das Wetter ist heute schön.", "German"), ("Wo ist der Bahnhof?", "German"),
    ("I like reading books in the evening.", "English"), ("J'aime lire le soir.", "French"),
    ("Me gusta leer por la noche.", "Spanish"), ("Ich lese abends gern.", "German"),
]


def tasks() -> list[Task]:
    return [
        Task("movie_review_sentiment", "sentiment",
             classify_templates("movie review", "Is the sentiment of this review positive or negative?", "review"),
             examples=[ex(lbl, review=t) for t, lbl in _MOVIE], options=("negative", "positive"),
             description="binary sentiment of short movie reviews (SST-2 style)"),
        Task("product_review_sentiment", "sentiment",
             classify_templates("product review", "Did the customer like the product? Answer positive or negative.",
                                "review"),
             generator=_product, options=("negative", "positive")),
        Task("tweet_sentiment", "sentiment",
             classify_templates("tweet", "What is the sentiment of this tweet?", "tweet"),
             generator=_tweet, options=("negative", "neutral", "positive")),
        Task("emotion", "sentiment",
             classify_templates("sentence", "Which emotion does the writer express?"),
             generator=_emotion, options=("anger", "fear", "joy", "sadness")),
        Task("news_topic", "classification",
             classify_templates("news headline", "What is the topic of this headline?", "article"),
             generator=_topic, options=("business", "science", "sports", "world")),
        Task("spam_detection", "classification",
             classify_templates("message", "Is this message spam?", "message"),
             generator=_spam, options=("not spam", "spam")),
        Task("formality", "classification",
             classify_templates("sentence", "Is this sentence formal or informal?"),
             examples=[ex(lbl, text=t) for t, lbl in _FORMALITY], options=("formal", "informal")),
        Task("question_type", "classification",
             classify_templates("question", "What kind of answer does this question expect?", "question"),
             generator=_qtype, options=("date", "number", "person", "place")),
        Task("language_id", "classification",
             classify_templates("sentence", "Which language is this sentence written in?"),
             examples=[ex(lbl, text=t) for t, lbl in _LANG], options=("English", "French", "German", "Spanish")),
    ]
