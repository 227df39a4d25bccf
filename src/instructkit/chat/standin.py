"""Stand-in tokenizers: a template's control tokens on a byte-level BPE trained in-process, for linting and testing a
chat template without downloading the model it belongs to (`instructkit template lint`, tests).

``CORPUS`` is the small English text the stand-ins and the tiny test models (models/tiny.py) train their BPE on.
"""

from __future__ import annotations

from instructkit.chat.render import derive_end_of_turn
from instructkit.chat.templates import (BUILTIN_TEMPLATES, FAMILY_TOKENS, ChatTemplate, get_template,
                                        template_family_tokens)

# A small corpus written for this purpose: enough English for a few hundred useful BPE merges.
CORPUS = """
Give three tips for staying healthy. Eat a balanced diet, exercise regularly and get enough sleep.
What is the capital of France? The capital of France is Paris.
Summarize the following text in one sentence. The report describes how the team improved the product.
Classify the sentiment of this review as positive or negative. I loved the movie, it was wonderful.
Translate the sentence into French. Write a short poem about the sea. Explain why the sky is blue.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Rewrite the sentence in the passive voice. Extract the names of the people mentioned in the paragraph.
Answer the question using the context. If you cannot answer, say that you do not know.
Write a Python function that returns the sum of a list of numbers. def add(a, b): return a + b
Compute 12 plus 30. The answer is 42. List the steps needed to bake bread: mix, knead, rise, shape, bake.
I cannot help with that request because it could cause harm. Here is a safer alternative.
Please respond in JSON with the keys name and age. Use exactly three bullet points. Answer in lowercase.
Instruction tuning teaches a pretrained language model to follow instructions and to stop when it is done.
The assistant answers the user politely, clearly and briefly, and then ends its turn.
"""


def standin_tokenizer(template: "str | ChatTemplate", vocab_size: int = 512):
    """A byte-level BPE tokenizer with a template's control tokens and that template as its chat_template. Any text
    encodes; trained in-process in well under a second.

    Built-in templates get their family's tokens (bos/eos/pad as in the family's real tokenizer); any other template
    gets the tokens it writes itself (``template_family_tokens``), and, when it does not write ``eos_token``, the
    token that closes its answers as eos (so the linter's verdict does not depend on a guessed family)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tpl = get_template(template)
    fam = FAMILY_TOKENS.get(tpl.name) if tpl.name in BUILTIN_TEMPLATES else None
    if fam is None:
        fam = template_family_tokens(tpl)
    specials: list[str] = []
    for t in [fam["bos"], fam["eos"], fam["pad"], *fam["extra"], *tpl.special_tokens]:
        if t and t not in specials:
            specials.append(t)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam["bos"], eos_token=fam["eos"],
                                   pad_token=fam["pad"], unk_token=None)
    if tpl.plain_tokens:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in tpl.plain_tokens])
    fast.chat_template = tpl.source
    if fam["eos"] is None:
        # the token that closes an answer, derived by rendering (what real instruct tokenizers have as eos)
        eot = derive_end_of_turn(tpl, fast) or derive_end_of_turn(tpl, fast, history=True)
        if not eot:
            from tokenizers import AddedToken

            fast.add_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)], special_tokens=True)
        fast.eos_token = eot or "<|endoftext|>"
    return fast
