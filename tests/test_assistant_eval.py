"""What the assistant recipe's evaluation and data rely on: decontamination that agrees with the contamination gate
(short evaluation texts included), `experiment curate`'s whole included sources and knowledge items, the evaluate
recipe's few-shot prefix (exemplars before every prompt, never scored) and its knowledge eval (rank classification
and exact match on fixed items, compared with a direct scoring)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.cli.lima import decontaminate
from instructkit.config import ConfigError, EvaluateConfig, ModelConfig
from instructkit.data.schema import Conversation, DataError, Message
from instructkit.eval.contamination import contaminating, require_clean
from instructkit.eval.t0 import T0Record, read_items, write_items
from instructkit.generation.engine import Engine
from instructkit.recipes import evaluate

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "t0_train_per_template.jsonl.gz").exists(),
                                  reason="../shared/data not present")


def _conv(q, a, **meta):
    return Conversation([Message("user", q), Message("assistant", a)], meta)


def test_decontaminate_agrees_with_the_gate_on_short_texts():
    """A held-out answer shorter than n words is compared whole by the gate; decontamination must remove a pool
    example containing it (it used to look only for full n-grams and missed it)."""
    short = "Thank you very much for your help."  # 7 words < 13
    long_q = " ".join(f"w{i}" for i in range(20))
    evals = [_conv("Say thanks to the team in one line.", short, task="heldout", inputs={"prompt": "Say thanks"},
                   target=short),
             _conv(long_q, "x", task="ifeval", inputs={"prompt": long_q})]
    pool = [_conv("Write a note.", "Dear Ann, thank you very much for your help. Best, Bo"),   # short text inside
            _conv("Repeat: " + " ".join(f"w{i}" for i in range(5, 18)), "ok"),                    # a 13-gram of long_q
            _conv("Repeat: " + " ".join(f"w{i}" for i in range(5, 17)), "ok"),                    # only 12 of them
            _conv("Thank you!", "You are welcome.")]
    assert contaminating(pool, evals, 13) == [0, 1]
    kept, removed = decontaminate(pool, evals, 13)
    assert removed == 2 and [c.messages[0].content for c in kept] == ["Repeat: " + " ".join(
        f"w{i}" for i in range(5, 17)), "Thank you!"]
    require_clean(kept, evals, 13, "kept")  # raises if the two disagree
    with pytest.raises(DataError, match="share a 13-gram"):
        require_clean(pool[:1], evals, 13, "first")


@needs_shared
def test_curate_includes_whole_sources_and_writes_knowledge_items(tmp_path):
    inc = tmp_path / "constraints.jsonl"
    from instructkit.data.builtin import load_builtin

    held = load_builtin("builtin:quickstart_heldout")[0].messages[0].content
    inc.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) for q, a in [
        ("Name a colour. Answer in lowercase letters only.", "blue is a colour people like a lot."),
        (held, "an answer to a held-out prompt, which must not be trained on."),
        ("List two fruits, no commas.", "apples and pears are both fruits."),
    ]) + "\n")
    out = tmp_path / "data" / "mix.jsonl"
    rc = main(["experiment", "curate", "--config", str(ROOT / "configs" / "mixtures" / "assistant_gemma.yaml"),
               "--out", str(out), f"t0_path={SHARED / 't0_train_per_template.jsonl.gz'}",
               f"alpaca_path={SHARED / 'lf_alpaca_en_demo.json'}", "ifeval_prompts=", "max_per_source=40",
               "heldout_alpaca=3", "n_examples=15", f"include_sources=[{inc}]",
               "knowledge_clusters=[sentiment]", "knowledge_per_dataset=2"])
    assert rc == 0
    rep = json.loads((tmp_path / "data" / "mix.jsonl.report.json").read_text())
    assert rep["included_sources"] == {str(inc): {"read": 3, "decontaminated": 1, "included": 2}}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == rep["examples"] == 17 and rep["contamination"]["clean"]
    assert sum(r["messages"][0]["content"].startswith(("Name a colour", "List two fruits")) for r in rows) == 2
    assert "knowledge" in rep["eval_sets"]
    items, options = read_items(rep["knowledge"])
    datasets = {r.dataset for r in items}
    assert len(items) == 2 * len(datasets) and {r.cluster for r in items} == {"sentiment"}
    assert all(r.index < 2 for r in items) and len({(r.dataset, r.template) for r in items}) == len(datasets)
    assert not {r.prompt.strip() for r in items} & {r["messages"][0]["content"] for r in rows}
    # the lima experiment refuses both settings instead of ignoring them
    assert main(["experiment", "lima", "--config", str(ROOT / "configs" / "tiny_lima.yaml"),
                 f"include_sources=[{inc}]", f"train.output_dir={tmp_path}"]) != 0


def test_items_file_round_trip_and_errors(tmp_path):
    items = [T0Record("sentiment", "imdb", "t1", "Great film. Positive or negative?", "positive", 0, 3),
             T0Record("closed_book_qa", "qa", "t2", "Capital of France?", "Paris", 0, 9)]
    p = tmp_path / "items.jsonl"
    write_items(p, items, {("imdb", "t1"): ["negative", "positive"]})
    back, opts = read_items(p)
    assert back == items and opts == {("imdb", "t1"): ["negative", "positive"]}
    bad = json.loads(p.read_text().splitlines()[0])
    bad["options"] = ["a", "b"]
    p.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"items.jsonl:1: options must.*contains the completion"):
        read_items(p)


def test_fewshot_config_needs_both_fields():
    with pytest.raises(ConfigError, match="fewshot_data and fewshot_k"):
        EvaluateConfig(evals=["stop_rate"], fewshot_k=2)
    with pytest.raises(ConfigError, match="fewshot_data and fewshot_k"):
        EvaluateConfig(evals=["stop_rate"], fewshot_data="builtin:quickstart_train")


def test_fewshot_prefix_before_every_prompt_and_never_scored(tmp_path, tiny_model_dir, monkeypatch):
    seen = []
    real_chat = Engine.chat

    def spy(self, convs, params=None):
        seen.extend([list(c) for c in convs])
        return real_chat(self, convs, params)

    monkeypatch.setattr(Engine, "chat", spy)
    heldout = tmp_path / "held.jsonl"
    heldout.write_text(json.dumps({"messages": [{"role": "user", "content": "What is two plus two?"},
                                                {"role": "assistant", "content": "Four."}]}) + "\n")
    common = dict(evals=["stop_rate", "refusal", "perplexity"], heldout_data=str(heldout), stop_rate_limit=3,
                  max_new_tokens=4, refusal_max_new_tokens=2, batch_size=4)
    zero = evaluate.main(EvaluateConfig(model=ModelConfig(path=str(tiny_model_dir)), save_dir=str(tmp_path / "zero"),
                                        **common))
    n_zero = len(seen)
    seen.clear()
    few = evaluate.main(EvaluateConfig(model=ModelConfig(path=str(tiny_model_dir)), save_dir=str(tmp_path / "few"),
                                       fewshot_data="builtin:quickstart_train", fewshot_k=2, **common))
    from instructkit.data.builtin import load_builtin

    ex = [m for c in load_builtin("builtin:quickstart_train")[:2] for m in c.messages]
    assert len(seen) == n_zero > 0
    for conv in seen:
        assert [(m["role"], m["content"]) for m in conv[:len(ex)]] == [(m.role, m.content) for m in ex]
        assert conv[len(ex)]["role"] == "user" and len(conv) == len(ex) + 1
    pz, pf = zero["perplexity"]["metrics"], few["perplexity"]["metrics"]
    assert pz["supervised_tokens"] == pf["supervised_tokens"]  # the exemplars' answers are not scored
    assert pz["heldout_loss"] != pf["heldout_loss"]  # but they are seen
    saved = json.loads(Path(few["stop_rate"]["file"]).read_text())
    assert saved["details"]["fewshot"] == {"data": "builtin:quickstart_train", "k": 2}


def test_knowledge_eval_matches_direct_scoring(tmp_path, tiny_model_dir):
    from instructkit.chat.render import Renderer
    from instructkit.eval.heldout import load_for_eval, score_options

    items = [T0Record("sentiment", "imdb", "t1", "Great film. Positive or negative?", "positive", 0, 1),
             T0Record("sentiment", "imdb", "t1", "Dull film. Positive or negative?", "negative", 1, 2),
             T0Record("topic", "news", "t2", "Stocks rose. Topic: business, sports or world?", "business", 0, 3),
             T0Record("closed_book_qa", "qa", "t3", "Capital of France?", "Paris", 0, 4)]
    opts = {("imdb", "t1"): ["negative", "positive"], ("news", "t2"): ["business", "sports", "world"]}
    path = tmp_path / "k.jsonl"
    write_items(path, items, opts)
    res = evaluate.main(EvaluateConfig(model=ModelConfig(path=str(tiny_model_dir)), evals=["knowledge"],
                                       knowledge_data=str(path), fewshot_data="builtin:quickstart_train",
                                       fewshot_k=1, knowledge_max_new_tokens=3, save_dir=str(tmp_path / "out")))
    m = res["knowledge"]["metrics"]
    saved = json.loads(Path(res["knowledge"]["file"]).read_text())
    recs = saved["samples"]
    model, tok = load_for_eval(tiny_model_dir)
    from instructkit.data.builtin import load_builtin

    prefix = list(load_builtin("builtin:quickstart_train")[0].messages)
    ranked = items[:3]
    scores = score_options(model, Renderer(tok), [(prefix + [Message("user", r.prompt)], opts[(r.dataset, r.template)])
                                                  for r in ranked], tok.pad_token_id or 0, shared_prefix=False)
    for r, sc, rec in zip(ranked, scores, recs):
        o = opts[(r.dataset, r.template)]
        assert rec["prediction"] == o[max(range(len(o)), key=lambda j: sc[j])]
        assert rec["score"] == float(rec["prediction"] == r.completion)
    assert recs[3]["metric"] == "exact_match"
    assert m["items"] == 4 and m["ranked"] == 3
    assert m["accuracy"] == pytest.approx(sum(r["score"] for r in recs) / 4)


def test_report_knowledge_kept_counts_items(tmp_path):
    from instructkit.eval.report import save_eval, write_report

    def run(name, scores):
        save_eval(tmp_path / name, "knowledge", {"accuracy": sum(scores) / len(scores)},
                  samples=[{"task": "d", "template": "t", "index": i, "score": float(s)} for i, s in enumerate(scores)])
        return tmp_path / name

    base = run("base", [1, 1, 1, 0, 0])
    tuned = run("tuned", [1, 0, 1, 1, 0])
    out = write_report([base, tuned], tmp_path / "r.md", names=["base", "tuned"])
    text = out.read_text()
    assert "| tuned | 5 | 0.6000 | 2/3 (0.6667) | 1/2 (0.5000) |" in text
    assert "| base | 5 | 0.6000 | 3/3 (1.0000) | 0/2 (0.0000) |" in text
