"""Win rates: under a reward model (tiny random LlamaForSequenceClassification) and under a pairwise LLM judge served
by a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from instructkit.cli import main
from instructkit.data.schema import DataError
from instructkit.eval import reward as rw

PAIRS = [
    rw.ResponsePair("What is 2+2?", "GOOD: 4.", "Maybe 5."),
    rw.ResponsePair("Name a colour.", "Dunno.", "GOOD: blue."),
    rw.ResponsePair("Say hi.", "hi", "hello"),
]


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tmp_path_factory):
    """A tiny Llama with a freshly initialised scalar head (seeded), saved as a plain sequence classifier."""
    from instructkit.models.value_head import load_sequence_classifier

    torch.manual_seed(0)
    model, tok = load_sequence_classifier(tiny_model_dir)
    with torch.no_grad():  # a larger head so that scores are well separated
        model.score.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    model.eval()
    return model, tok, path


def _unpadded_score(model, tok, prompt, response):
    """Reference: render user+assistant with the chat template, cut after the end-of-turn token, and read the head at
    the last token of an unpadded batch of one (transformers' own pooling picks the last token then)."""
    from instructkit.chat.render import Renderer

    r = Renderer(tok).render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    last = max(i for i, m in enumerate(r.loss_mask) if m)  # the end-of-turn token
    ids = torch.tensor([r.input_ids[: last + 1]])
    assert r.input_ids[last] in Renderer(tok).stop_token_ids
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def test_reward_scores_equal_unpadded_reference(reward_model):
    model, tok, _ = reward_model
    prompts = [p.prompt for p in PAIRS]
    responses = [p.response_a for p in PAIRS]
    batched = rw.reward_scores(model, tok, prompts, responses, batch_size=3)  # padded: prompts left, responses right
    ref = [_unpadded_score(model, tok, p, r) for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(ref, abs=1e-5)
    assert len(set(round(x, 4) for x in ref)) == 3  # distinct scores: the comparison below means something


def test_reward_model_winrate_by_hand(reward_model):
    model, tok, path = reward_model
    res = rw.reward_model_winrate_scored(model, tok, PAIRS)
    ra, rb = res["rewards_a"], res["rewards_b"]
    wins = sum(a > b for a, b in zip(ra, rb))
    ties = sum(a == b for a, b in zip(ra, rb))
    assert res["winrate"] == pytest.approx((wins + ties / 2) / 3)
    assert res["wins"] == wins and res["n"] == 3
    assert res["mean_margin"] == pytest.approx(sum(a - b for a, b in zip(ra, rb)) / 3)
    # B vs A is the mirror image: win rates sum to 1
    mirrored = [rw.ResponsePair(p.prompt, p.response_b, p.response_a) for p in PAIRS]
    assert rw.reward_model_winrate_scored(model, tok, mirrored)["winrate"] == pytest.approx(1 - res["winrate"])
    # a model against itself ties everywhere: 0.5 exactly
    same = [rw.ResponsePair(p.prompt, p.response_a, p.response_a) for p in PAIRS]
    r = rw.reward_model_winrate_scored(model, tok, same)
    assert r["winrate"] == 0.5 and r["ties"] == 3
    # from the saved folder (what the CLI does): same numbers
    assert rw.reward_model_winrate(path, PAIRS)["rewards_a"] == pytest.approx(ra, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------------------------------


def _section(text, name):
    m = re.search(rf"## Output \({name}\)\n(.*?)\n\n## ", text, flags=re.S)
    return m.group(1)


class _FakeJudge(BaseHTTPRequestHandler):
    """/v1/chat/completions. model "fair": prefers the output containing GOOD (tie if neither or both);
    "biased": always "Output (a)"; "vague": an unparseable reply."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.server.auth.append(self.headers.get("Authorization"))
        user = body["messages"][-1]["content"]
        a, b = _section(user, "a"), _section(user, "b")
        if body["model"] == "biased":
            reply = "Output (a)"
        elif body["model"] == "vague":
            reply = "Both have merits."
        elif ("GOOD" in a) == ("GOOD" in b):
            reply = "Tie"
        else:
            reply = "Output (a)" if "GOOD" in a else "I prefer Output (b)."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    server.requests = []
    server.auth = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("text,verdict", [
    ("Output (a)", "a"), ("I prefer Output (b).", "b"), ("output b", "b"), ("Tie", "tie"), ("TIE.", "tie"),
    ("Output (a) is better than Output (b)", None), ("Both have merits.", None), ("Output (a), Output (a)", "a"),
])
def test_parse_verdict(text, verdict):
    assert rw.parse_verdict(text) == verdict


def test_judge_both_orders_and_raw_verdicts(judge_url, tmp_path):
    url, server = judge_url
    verdicts = tmp_path / "verdicts.jsonl"
    res = rw.judge_winrate(rw.OpenAIJudge(url, model="fair"), PAIRS, verdicts_path=verdicts)
    # pair 1: A has GOOD -> A wins in both orders (1); pair 2: B has GOOD -> 0; pair 3: tie -> 0.5. (1+0+0.5)/3 = 0.5
    assert res["winrate"] == pytest.approx(0.5)
    assert (res["wins"], res["losses"], res["ties"], res["n"]) == (1, 1, 1, 3)
    assert res["position_consistency"] == 1.0 and res["unparsed"] == 0
    rows = [json.loads(x) for x in verdicts.read_text().splitlines()]
    assert len(rows) == 6 and {r["order"] for r in rows} == {"A_first", "B_first"}
    assert rows[1] == {"prompt": "What is 2+2?", "order": "B_first", "raw": "I prefer Output (b).", "verdict": "b",
                       "score_a": 1.0}
    # the judge really saw both orders of every pair (requests may arrive in any order: 4 run concurrently)
    shown = {(_section(r["messages"][-1]["content"], "a"), _section(r["messages"][-1]["content"], "b"))
             for r in server.requests[-6:]}
    assert shown == {(p.response_a, p.response_b) for p in PAIRS} | {(p.response_b, p.response_a) for p in PAIRS}


def test_position_bias_cancels_and_is_reported(judge_url):
    url, _ = judge_url
    res = rw.judge_winrate(rw.OpenAIJudge(url, model="biased"), PAIRS)
    # always "(a)": A wins when first, loses when second -> 0.5 on every prompt; never consistent
    assert res["winrate"] == 0.5 and res["ties"] == 3 and res["position_consistency"] == 0.0
    res = rw.judge_winrate(rw.OpenAIJudge(url, model="vague"), PAIRS)
    assert res["winrate"] == 0.5 and res["unparsed"] == 6


def test_winrate_cli_with_judge(judge_url, tmp_path, capsys):
    url, _ = judge_url
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response_a}) + "\n" for p in PAIRS))
    b.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response_b}) + "\n" for p in reversed(PAIRS)))
    model_a = tmp_path / "model_a"
    code = main(["evaluate", "winrate", "--responses-a", str(a), "--responses-b", str(b), "--judge-url", url,
                 "--judge-model", "fair", "--verdicts", str(tmp_path / "v.jsonl"), "--save-to", str(model_a), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["winrate"] == pytest.approx(0.5) and out["n"] == 3
    saved = json.loads((model_a / "eval" / "winrate_judge.json").read_text())
    assert saved["metrics"]["winrate"] == out["winrate"]
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 6


def test_mismatched_response_files_are_an_error(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"prompt": "x", "response": "1"}) + "\n")
    b.write_text(json.dumps({"prompt": "y", "response": "2"}) + "\n")
    with pytest.raises(DataError, match="different prompts"):
        rw.paired_responses(a, b)
    b.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="b.jsonl:1"):
        rw.paired_responses(a, b)


def test_judge_api_key_is_sent_but_never_saved(judge_url, tmp_path, monkeypatch, capsys):
    url, server = judge_url
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("JUDGE_KEY", secret)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response_a}) + "\n" for p in PAIRS))
    b.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response_b}) + "\n" for p in PAIRS))
    n_before = len(server.auth)
    assert main(["evaluate", "winrate", "--responses-a", str(a), "--responses-b", str(b), "--judge-url", url,
                 "--judge-model", "fair", "--judge-api-key-env", "JUDGE_KEY", "--verdicts", str(tmp_path / "v.jsonl"),
                 "--save-to", str(tmp_path / "m"), "--json"]) == 0
    assert server.auth[n_before:] == [f"Bearer {secret}"] * 6
    captured = capsys.readouterr()
    for text in [captured.out, captured.err, *(p.read_text() for p in tmp_path.rglob("*") if p.is_file())]:
        assert secret not in text
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(ValueError, match="JUDGE_KEY"):  # named but unset: an error, not a silent keyless call
        rw.OpenAIJudge(url, model="fair", api_key_env="JUDGE_KEY")


def test_saved_evaluation_files_pair_up(tmp_path):
    from instructkit.eval.report import save_eval

    for name, side in (("a", "response_a"), ("b", "response_b")):
        save_eval(tmp_path / name, "responses", {"stop_rate": 1.0},
                  samples=[{"prompt": p.prompt, "response": getattr(p, side), "finish_reason": "stop"} for p in PAIRS])
    pairs = rw.paired_responses(tmp_path / "a" / "eval" / "responses.json", tmp_path / "b" / "eval" / "responses.json")
    assert pairs == PAIRS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"samples": [{"prompt": "x"}]}))
    with pytest.raises(DataError, match="bad.json record 0"):
        rw.paired_responses(bad, bad)
