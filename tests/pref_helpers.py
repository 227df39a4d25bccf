"""Synthetic preference data shared by the reward-model and DPO tests.

The rule to learn: the chosen answer uses words from GOOD, the rejected one words from BAD.
"""

import json
import random

GOOD = ["good", "great", "happy", "nice", "kind", "clear"]
BAD = ["bad", "sad", "poor", "cold", "dark", "slow"]
TOPICS = ["the sea", "bread", "the sky", "a poem", "Paris", "the dog", "numbers", "a fox"]


def write_pairs(path, n, seed):
    """Write ``n`` internal-format preference pairs to ``path`` (deterministic by ``seed``) and return ``path``."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            t = rng.choice(TOPICS)
            good = " ".join(rng.choice(GOOD) for _ in range(3))
            bad = " ".join(rng.choice(BAD) for _ in range(3))
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Tell me about {t}."}],
                                "chosen": [{"role": "assistant", "content": f"It is {good}."}],
                                "rejected": [{"role": "assistant", "content": f"It is {bad}."}]}) + "\n")
    return path
