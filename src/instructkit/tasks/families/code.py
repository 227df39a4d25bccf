"""Code (cluster "code"): tracing generated snippets (answers computed here, not by executing text), reading
function behaviour, identifying the language, and writing short functions (ROUGE-L against a reference)."""

from __future__ import annotations

import random

from instructkit.tasks.bank import Task
from instructkit.tasks.families._common import ex, tpl


def _trace_loop(rng: random.Random):
    start, step, n = rng.randint(0, 10), rng.randint(1, 5), rng.randint(2, 6)
    code = f"x = {start}\nfor i in range({n}):\n    x = x + {step}\nprint(x)"
    return ex(start + step * n, code=code)


def _trace_branch(rng: random.Random):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    code = f"a = {a}\nb = {b}\nif a > b:\n    print(a - b)\nelse:\n    print(b - a)"
    return ex(abs(a - b), code=code)


def _trace_list(rng: random.Random):
    xs = rng.sample(range(1, 30), rng.randint(3, 6))
    i = rng.randrange(-len(xs), len(xs))
    return ex(xs[i], code=f"xs = {xs}\nprint(xs[{i}])")


def _trace_string(rng: random.Random):
    w = rng.choice(["python", "function", "variable", "compiler", "keyboard", "network"])
    k = rng.randint(1, len(w) - 1)
    op = rng.randrange(3)
    code, out = [(f"s = \"{w}\"\nprint(s[:{k}])", w[:k]), (f"s = \"{w}\"\nprint(s[::-1])", w[::-1]),
                 (f"s = \"{w}\"\nprint(s.upper()[{k}])", w.upper()[k])][op]
    return ex(out, code=code)


_FUNCS = [
    ("def f(xs):\n    return sum(xs) / len(xs)", "the average of a list of numbers"),
    ("def f(s):\n    return s == s[::-1]", "whether a string is a palindrome"),
    ("def f(xs):\n    return max(xs)", "the largest element of a list"),
    ("def f(n):\n    return n % 2 == 0", "whether a number is even"),
    ("def f(s):\n    return len(s.split())", "the number of words in a string"),
    ("def f(xs):\n    return sorted(set(xs))", "the sorted unique elements of a list"),
]
_DESCRIPTIONS = sorted({d for _, d in _FUNCS})

_LANGS = [
    ("def greet(name):\n    print(f\"Hello, {name}\")", "Python"),
    ("for i in range(3):\n    print(i)", "Python"),
    ("function add(a, b) {\n  return a + b;\n}", "JavaScript"),
    ("const xs = [1, 2, 3].map(x => x * 2);", "JavaScript"),
    ("#include <stdio.h>\nint main() { printf(\"hi\"); return 0; }", "C"),
    ("int square(int x) { return x * x; }", "C"),
    ("SELECT name FROM users WHERE age > 30;", "SQL"),
    ("UPDATE items SET price = 10 WHERE id = 4;", "SQL"),
    ("fn main() {\n    println!(\"hi\");\n}", "Rust"),
    ("let v: Vec<i32> = vec![1, 2, 3];", "Rust"),
]

_WRITE = [
    ("returns the sum of a list of numbers", "def total(xs):\n    return sum(xs)"),
    ("returns the largest of two numbers", "def largest(a, b):\n    return a if a > b else b"),
    ("reverses a string", "def reverse(s):\n    return s[::-1]"),
    ("counts the vowels in a string", "def count_vowels(s):\n    return sum(1 for c in s.lower() if c in \"aeiou\")"),
    ("checks whether a number is prime",
     "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n"
     "        if n % d == 0:\n            return False\n    return True"),
    ("returns the factorial of n", "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n"
                                   "        result *= k\n    return result"),
    ("removes duplicates from a list while keeping order",
     "def dedup(xs):\n    seen = set()\n    return [x for x in xs if not (x in seen or seen.add(x))]"),
    ("converts Celsius to Fahrenheit", "def c_to_f(c):\n    return c * 9 / 5 + 32"),
]

_TRACE = tpl(
    "What does this Python code print?\n\n{code}", "{code}\n\nWhat is the output of the program above?",
    "Trace the code and give its output.\n```python\n{code}\n```", "Code:\n{code}\nOutput:",
    "Run this in your head and tell me what gets printed:\n{code}",
    "Predict the printed value.\n{code}",
)


def tasks() -> list[Task]:
    return [
        Task("trace_loop", "code", _TRACE, "exact_match", generator=_trace_loop),
        Task("trace_branch", "code", _TRACE, "exact_match", generator=_trace_branch),
        Task("trace_list_index", "code", _TRACE, "exact_match", generator=_trace_list),
        Task("trace_string", "code", _TRACE, "exact_match", generator=_trace_string),
        Task("function_purpose", "code", tpl(
            "What does this function compute?\n\n{code}\n\n{options_}",
            "{code}\n\nDescribe what f returns.\n{options_}", "Read the function and choose its purpose.\n{code}\n"
                                                               "{options_}",
            "Code:\n{code}\nThe function returns:\n{options_}", "Which description matches this code?\n{code}\n"
                                                                "{options_}",
        ), examples=[ex(d, _DESCRIPTIONS, code=c) for c, d in _FUNCS]),
        Task("code_language", "code", tpl(
            "Which programming language is this?\n\n{code}\n\n{options_}",
            "{code}\n\nWhat language is the code above written in?\n{options_}",
            "Identify the language of the snippet.\n{code}\n{options_}", "Code: {code}\nLanguage:\n{options_}",
            "Name the programming language used here:\n{code}\n{options_}",
        ), examples=[ex(lang, code=c) for c, lang in _LANGS], options=("C", "JavaScript", "Python", "Rust", "SQL")),
        Task("write_function", "code", tpl(
            "Write a Python function that {spec}.", "Implement a Python function which {spec}.",
            "In Python, write a short function that {spec}.", "Python: a function that {spec}. Code only.",
            "Give me Python code for a function that {spec}.",
        ), "rouge_l", examples=[ex(c, spec=s) for s, c in _WRITE]),
    ]
