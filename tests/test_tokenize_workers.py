"""``data.num_workers``: SFT's rendering and tokenisation in several processes gives exactly the rows of one process
(same order, ids and loss masks, truncation and drop counts after them), errors keep their message, the CLI run is
the same, and recipes that tokenise elsewhere refuse the setting."""

from __future__ import annotations

import json

import pytest

from instructkit.cli import main as cli_main
from instructkit.config import ConfigError, SFTConfig, from_dict
from instructkit.data.schema import Conversation, Message

from sft_helpers import losses, write_config


def _conversations() -> list[Conversation]:
    """Mixed lengths and shapes: system prompts, multi-turn, one conversation far longer than max_length (truncated),
    one whose assistant turn sits beyond max_length (nothing supervised left: dropped)."""
    convs = []
    for i in range(23):
        msgs = [Message("user", f"Question {i}: " + "word " * (i % 7)), Message("assistant", f"Answer {i}.")]
        if i % 3 == 0:
            msgs = [Message("system", "Be brief.")] + msgs
        if i % 4 == 0:
            msgs += [Message("user", "More?"), Message("assistant", "No more " * (i % 5 + 1))]
        convs.append(Conversation(messages=msgs))
    convs.append(Conversation(messages=[Message("user", "x " * 200), Message("assistant", "late answer")]))
    convs.append(Conversation(messages=[Message("user", "hi"), Message("assistant", "long " * 200)]))
    return convs


def _cfg(workers: int, mask: str = "all_assistant") -> SFTConfig:
    return from_dict(SFTConfig, {"model": {"path": "tiny:", "template": "chatml"},
                                 "data": {"max_length": 64, "num_workers": workers, "mask": mask},
                                 "train": {"pack_length": 64}})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from instructkit.models.tiny import create_tiny

    return AutoTokenizer.from_pretrained(create_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0))


@pytest.mark.parametrize("mask", ["all_assistant", "last_assistant"])
def test_two_workers_give_the_rows_of_one_process(tokenizer, mask):
    from instructkit.recipes.sft import render_samples
    from instructkit.training.packing import prepare_samples

    convs = _conversations()
    one = render_samples(convs, tokenizer, _cfg(0, mask))
    two = render_samples(convs, tokenizer, _cfg(2, mask))
    three = render_samples(convs, tokenizer, _cfg(3, mask))  # 25 conversations in 12 chunks of 3: a short last one
    assert len(one) == len(convs)
    for other in (two, three):
        assert [(s.input_ids, s.loss_mask) for s in other] == [(s.input_ids, s.loss_mask) for s in one]
    kept_one, stats_one = prepare_samples(one, 64)
    kept_two, stats_two = prepare_samples(two, 64)
    assert stats_two.as_dict() == stats_one.as_dict()
    assert stats_one.truncated >= 1 and sum(stats_one.dropped.values()) >= 1
    assert [(s.input_ids, s.loss_mask) for s in kept_two] == [(s.input_ids, s.loss_mask) for s in kept_one]


def test_an_error_in_a_worker_is_raised_with_its_message(tokenizer):
    """A chat template that refuses a record (as Hugging Face templates do with ``raise_exception``): the error a
    worker meets is the one the training process would meet, with the same message."""
    import copy

    from instructkit.recipes.sft import render_samples

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
        "{{ raise_exception('record with a forbidden word: ' + m['content']) }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    convs = _conversations()
    convs[17] = Conversation(messages=[Message("user", "FORBIDDEN 17"), Message("assistant", "no")])
    cfg0, cfg2 = _cfg(0), _cfg(2)
    cfg0.model.template = cfg2.model.template = "auto"
    with pytest.raises(Exception) as in_process:
        render_samples(convs, tok, cfg0)
    with pytest.raises(type(in_process.value)) as in_worker:
        render_samples(convs, tok, cfg2)
    assert "forbidden word: FORBIDDEN 17" in str(in_process.value)
    assert str(in_worker.value) == str(in_process.value)


def test_negative_workers_are_refused():
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0"):
        _cfg(-1)


def test_sft_cli_with_two_workers_equals_one_process(tmp_path, capsys):
    runs = {}
    for workers in (0, 2):  # separate folders: the tokenisation cache (<output_dir>/.cache) is not shared
        d = tmp_path / f"w{workers}"
        d.mkdir()
        cfg = write_config(d, "run", train={"max_steps": 4}, data={"num_workers": workers})
        assert cli_main(["sft", "--config", str(cfg)]) == 0
        assert "rows computed" in capsys.readouterr().err  # tokenised, not read from a cache
        runs[workers] = d / "runs" / "run"
    assert losses(runs[2]) == losses(runs[0]) and len(losses(runs[0])) == 4
    stats = [json.loads((r / "data_stats.json").read_text()) for r in runs.values()]
    assert stats[0] == stats[1]


def test_a_recipe_that_tokenises_elsewhere_refuses_workers(tmp_path, capsys):
    """The refusal comes from Run.start, before any data is read or model loaded."""
    from pathlib import Path

    import yaml

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny_dpo.yaml").read_text())
    base.setdefault("data", {})["num_workers"] = 2
    base.setdefault("train", {})["output_dir"] = str(tmp_path / "runs")
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump(base))
    assert cli_main(["dpo", "--config", str(cfg)]) != 0
    assert "data.num_workers=2 is not available in `dpo`" in capsys.readouterr().err
