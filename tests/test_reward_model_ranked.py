"""K-wise ranked responses for the reward model (InstructGPT: all K-choose-2 comparisons of a prompt in one batch).

The `ranked` format and its errors, regrouping pairs by prompt, one forward row per distinct response, the
group-weighted loss against hand-computed values, exact gradient accumulation over groups, a validation split by
group, DPO and `data` commands on ranked files, and a CLI run that learns a ranking rule."""

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instructkit.cli import main as cli
from instructkit.data.formats import convert_record, detect_format
from instructkit.data.io import ReadStats, read_examples, read_pairs, write_jsonl
from instructkit.data.schema import DataError, Message

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_reward_model.yaml")
DPO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_dpo.yaml")

MARK = "good"
FILLER = ["blue", "tall", "old", "new", "round", "soft", "warm", "loud"]
TOPICS = ["the sea", "bread", "the sky", "a poem", "Paris", "the dog", "numbers", "a fox"]


def ranked_records(n, seed, k=4, words=4):
    """Synthetic rankings: K responses of ``words`` words, response i holds K-1-i copies of MARK (best first), so the
    rule to learn is "more MARK is better". Each record: {"prompt", "responses"} (best first)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        responses = []
        for m in range(k - 1, -1, -1):
            w = [MARK] * m + [rng.choice(FILLER) for _ in range(words - m)]
            rng.shuffle(w)
            responses.append("It is " + " ".join(w) + ".")
        out.append({"prompt": f"Tell me about {rng.choice(TOPICS)}.", "responses": responses})
    return out


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def texts(pair):
    return pair.chosen[0].content, pair.rejected[0].content


# ---------------------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------------------
def test_k4_record_gives_six_pairs_best_first():
    rec = {"prompt": "Name a colour.", "responses": ["red", "blue", "green", "grey"], "id": 7}
    assert detect_format(rec) == "ranked"
    pairs = convert_record(rec, "ranked")
    assert [texts(p) for p in pairs] == [("red", "blue"), ("red", "green"), ("red", "grey"), ("blue", "green"),
                                         ("blue", "grey"), ("green", "grey")]
    assert [p.meta["ranks"] for p in pairs] == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    groups = {p.meta["group"] for p in pairs}
    assert len(groups) == 1 and next(iter(groups)).startswith("ranked:")
    assert all(p.prompt == [Message("user", "Name a colour.")] and p.meta["id"] == 7 for p in pairs)
    # the id is a function of the content: the same record gives the same group, another record another group
    assert convert_record(dict(rec), "ranked")[0].meta["group"] in groups
    other = convert_record(dict(rec, responses=["red", "blue", "green", "gray"]), "ranked")[0].meta["group"]
    assert other not in groups


@pytest.mark.parametrize("completions", [
    # higher score is better: order 1 (3.0), 2 (2.0), 0 (1.0)
    [{"response": "a", "score": 1.0}, {"text": "b", "score": 3}, {"content": "c", "score": 2.0}],
    # rank 0 is best: the same order
    [{"response": "a", "rank": 2}, {"response": "b", "rank": 0}, {"response": "c", "rank": 1}],
    # a response as a message list
    [{"response": "a", "rank": 2}, {"response": [{"role": "assistant", "content": "b"}], "rank": 0},
     {"response": "c", "rank": 1}],
])
def test_scored_and_rank_variants(completions):
    rec = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
           "completions": completions}
    assert detect_format(rec) == "ranked"
    pairs = convert_record(rec, "ranked")
    assert [texts(p) for p in pairs] == [("b", "c"), ("b", "a"), ("c", "a")]
    assert [p.meta["ranks"] for p in pairs] == [[1, 2], [1, 0], [2, 0]]  # positions in the record's list
    assert pairs[0].prompt[0] == Message("system", "Be brief.")


def test_ties_give_no_pair():
    # scores 2, 1, 1, 0: of the 6 pairs, (1, 2) is a tie -> 5 pairs
    rec = {"prompt": "q", "completions": [{"response": r, "score": s} for r, s in zip("wxyz", [2, 1, 1, 0])]}
    pairs = convert_record(rec, "ranked")
    assert [p.meta["ranks"] for p in pairs] == [[0, 1], [0, 2], [0, 3], [1, 3], [2, 3]]


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.one_of(st.integers(-2, 2), st.floats(allow_nan=True), st.text(max_size=2), st.none(),
                                 st.booleans()), max_size=6),
       responses=st.lists(st.text(max_size=4), max_size=6))
def test_property_scored_records_give_every_untied_pair_or_a_data_error(scores, responses):
    """Property: any scores and texts give a DataError or exactly the pairs (i, j) with score_i > score_j."""
    rec = {"prompt": "q\ud800", "completions": [{"response": t, "score": s} for t, s in zip(responses, scores)]}
    try:
        pairs = convert_record(rec, "ranked")
    except DataError:
        return
    sc = [float(s) for s in scores[:len(responses)]]
    expected = {(i, j) for i in range(len(sc)) for j in range(len(sc)) if sc[i] > sc[j]}
    assert sorted(tuple(p.meta["ranks"]) for p in pairs) == sorted(expected)
    assert len({p.meta["group"] for p in pairs}) == 1


BAD = [
    ({"prompt": "q", "responses": ["only one"]}, "'responses' needs at least 2 responses to rank, got 1"),
    ({"prompt": "q", "responses": []}, "got 0"),
    ({"prompt": "q", "responses": ["a", "  "]}, "responses[1] turn 1: empty assistant turn"),
    ({"prompt": "q", "responses": ["a", []]}, "responses[1] is empty"),
    ({"prompt": "q", "responses": ["a", 3]}, "'responses[1]' must be a string or a list of messages"),
    ({"prompt": "q", "completions": [{"response": "a", "score": "high"}, {"response": "b", "score": 1}]},
     "completions[0].score must be a finite number, got 'high'"),
    ({"prompt": "q", "completions": [{"response": "a", "score": float("nan")}, {"response": "b", "score": 1}]},
     "completions[0].score must be a finite number"),
    ({"prompt": "q", "completions": [{"response": "a", "score": True}, {"response": "b", "score": 1}]},
     "completions[0].score must be a finite number"),
    ({"prompt": "q", "completions": [{"response": "a", "score": 1}, {"response": "b", "score": 1}]},
     "all 2 responses are tied"),
    ({"prompt": "q", "completions": [{"response": "a", "score": 1}, {"response": "b", "rank": 0}]},
     "mix 'score' and 'rank'"),
    ({"prompt": "q", "completions": [{"response": "a"}, {"response": "b", "rank": 0}]},
     "completions[0] must have exactly one of 'score'"),
    ({"prompt": "q", "completions": [{"answer": "a", "rank": 1}, {"response": "b", "rank": 0}]},
     "completions[0] has none of the fields"),
    ({"prompt": "q", "completions": ["a", "b"]}, "completions[0] must be an object"),
    ({"prompt": "q", "responses": ["a", "b", "a"]}, "responses[0] and responses[2] are identical but ranked"),
    ({"responses": ["a", "b"]}, "missing field 'prompt'"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "responses": ["a", "b"]}, "prompt turn 0: roles out of order"),
    ({"prompt": "q", "responses": ["a", "b"], "completions": []}, "exactly one of 'responses'"),
]


@pytest.mark.parametrize("record, reason", BAD)
def test_bad_record_says_what_is_wrong(record, reason):
    with pytest.raises(DataError) as e:
        convert_record(record, "ranked")
    assert reason in str(e.value)


def test_bad_records_in_a_file_are_located_and_skippable(tmp_path):
    good = ranked_records(2, 0)
    path = write_lines(tmp_path / "r.jsonl", [good[0]] + [r for r, _ in BAD[:3]] + [good[1]])
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:2: ") and BAD[0][1] in str(e.value)
    stats = ReadStats()
    rejects = tmp_path / "rejects.jsonl"
    pairs = read_pairs(path, skip_invalid=True, rejects_path=rejects, max_invalid_fraction=0.9, stats=stats)
    assert (stats.total, stats.kept, stats.rejected, stats.examples) == (5, 2, 3, 12)  # 2 records x C(4, 2) pairs
    rows = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4]
    assert [BAD[i][1] in rows[i]["reason"] for i in range(3)] == [True] * 3
    assert len(pairs) == 12 and {p.meta["line"] for p in pairs} == {1, 5}


def test_ranked_file_converts_validates_and_trains_dpo(tmp_path):
    """Pairs of a ranked file are ordinary PreferencePairs: `data validate`/`convert` take them, the internal JSONL
    keeps their group (so the reward model regroups them after conversion), and DPO trains on them."""
    from instructkit.data.preference import group_pairs

    src = write_lines(tmp_path / "ranked.jsonl", ranked_records(6, 3))
    assert cli(["data", "validate", str(src)]) == 0
    out = tmp_path / "pairs.jsonl"
    assert cli(["data", "convert", str(src), str(out)]) == 0
    stats = ReadStats()
    back = read_examples(out, stats=stats)
    assert stats.format == "preference" and len(back) == 36
    assert [len(g) for g in group_pairs(back)] == [6] * 6
    assert [[p.meta["ranks"] for p in g] for g in group_pairs(back)] == \
        [[[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]] * 6
    write_jsonl(tmp_path / "again.jsonl", back)  # round trip again: still the same groups
    assert [len(g) for g in group_pairs(read_pairs(tmp_path / "again.jsonl"))] == [6] * 6
    assert cli(["dpo", "--config", DPO_CONFIG, f"data.sources=[{{path: {src}}}]", "data.validation_fraction=0",
                f"train.output_dir={tmp_path}", "train.run_name=dpo", "train.max_steps=1"]) == 0
    first = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()][1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1: -log sigmoid(0)


OASST_TREES = Path(__file__).parent / "fixtures" / "ranked_oasst_trees.jsonl"


def test_oasst_trees_give_ranked_groups():
    """Hand-written oasst trees-export records (fixtures/ranked_oasst_trees.jsonl). Tree 1: the root prompt has
    replies ranked [1, 0, 2] and one unranked; a follow-up prompt under the rank-1 reply has ranks [1, 0] and a
    deleted reply. Tree 2 has one reply per prompt: nothing to compare."""
    stats = ReadStats()
    pairs = read_pairs(OASST_TREES, stats=stats)
    assert (stats.format, stats.total, stats.kept, stats.examples) == ("oasst_ranked", 2, 2, 4)
    assert [p.meta["group"] for p in pairs] == ["oasst:tree-1:p1"] * 3 + ["oasst:tree-1:p2"]
    assert [p.meta["ranks"] for p in pairs] == [[1, 0], [1, 2], [0, 2], [1, 0]]  # positions in "replies"
    assert [p.chosen[0].content[:12] for p in pairs] == ["Cover the eg", "Cover the eg", "Put it in bo", "About six mi"]
    assert [p.rejected[0].content[:12] for p in pairs] == ["Put it in bo", "Eggs are lai", "Eggs are lai",
                                                           "Boil it for "]
    assert [m.role for m in pairs[3].prompt] == ["user", "assistant", "user"]
    assert pairs[3].prompt[1].content.startswith("Put it in boiling water")
    assert all(p.meta["line"] == 1 and p.meta["message_tree_id"] == "tree-1" for p in pairs)


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t["prompt"]["replies"][1].update(rank="first"), "prompt.replies[1].rank must be a finite number"),
    (lambda t: t["prompt"]["replies"][1].update(role="prompter"),
     "prompt.replies[1]: a ranked reply to a prompter must be an assistant text"),
    (lambda t: t["prompt"]["replies"][0]["replies"][0].update(role="assistant"),
     "prompt.replies[0].replies[0]: roles out of order: 'assistant' after 'assistant'"),
    (lambda t: t["prompt"]["replies"][2].update(text=" "), "prompt.replies[2] turn 1: empty assistant turn"),
    (lambda t: t["prompt"].update(replies={"a": 1}), "prompt.replies must be a list"),
    (lambda t: t.update(prompt="How?"), "field 'prompt' must be the tree's root message object"),
])
def test_bad_oasst_tree_names_the_message(edit, reason):
    tree = json.loads(OASST_TREES.read_text().splitlines()[0])
    edit(tree)
    with pytest.raises(DataError) as e:
        convert_record(tree, "oasst_ranked")
    assert reason in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# Regrouping and the batch layout
# ---------------------------------------------------------------------------------------------------------------------
def test_pairs_regroup_and_each_response_is_one_row(tiny_tokenizer):
    from instructkit.chat.render import Renderer
    from instructkit.data.schema import PreferencePair
    from instructkit.recipes.reward_model import group_batch
    from instructkit.data.preference import encode_groups, encode_response, group_pairs

    ranked = convert_record({"prompt": "q", "responses": ["r0", "r1", "r2", "r3"]}, "ranked")
    plain = [PreferencePair([Message("user", "p")], [Message("assistant", c)], [Message("assistant", r)])
             for c, r in (("yes", "no"), ("up", "down"))]
    # interleaved input order: the ranked pairs still form one group, placed where its first pair was
    groups = group_pairs([plain[0]] + ranked[:3] + [plain[1]] + ranked[3:])
    assert [len(g) for g in groups] == [1, 6, 1]
    renderer = Renderer(tiny_tokenizer)
    enc, dropped = encode_groups(renderer, groups)
    assert dropped == {"too_long": 0, "identical": 0, "duplicate": 0}
    assert [len(g.responses) for g in enc] == [2, 4, 2]
    assert enc[1].pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert enc[1].responses[2] == encode_response(renderer, ranked[0].prompt, [Message("assistant", "r2")])[1]
    batch = group_batch(enc, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 8 and batch["n"] == 3 and batch["n_pairs"] == 8  # not 2 * 8 rows
    # rows by slot: [g0 r0, g1 r0, g2 r0, g0 r1, g1 r1, g2 r1, g1 r2, g1 r3]
    assert batch["better"].tolist() == [0, 1, 1, 1, 4, 4, 6, 2]
    assert batch["worse"].tolist() == [3, 4, 6, 7, 6, 7, 7, 5]
    assert batch["pair_weight"].tolist() == pytest.approx([1.0] + [1 / 6] * 6 + [1.0])
    # a pair repeated inside its group counts once; identical-after-truncation is dropped as before
    enc2, dropped2 = encode_groups(renderer, [ranked + ranked[:2]])
    assert len(enc2[0].pairs) == 6 and dropped2["duplicate"] == 2


def test_recipe_forwards_each_response_once(tmp_path, monkeypatch):
    """Through the CLI: a micro-batch of one K=4 group runs the model on 4 rows (pairs would need 2 * 6 = 12)."""
    import instructkit.recipes.reward_model as rm

    rows = []
    real = rm.sequence_scores

    def spy(model, input_ids, attention_mask, *a, **k):
        rows.append(input_ids.shape[0])
        return real(model, input_ids, attention_mask, *a, **k)

    monkeypatch.setattr(rm, "sequence_scores", spy)
    src = write_lines(tmp_path / "r.jsonl", ranked_records(4, 0))
    assert cli(["reward-model", "--config", CONFIG, f"data.sources=[{{path: {src}}}]", "data.validation_fraction=0",
                f"train.output_dir={tmp_path}", "train.run_name=once", "train.max_steps=2",
                "train.micro_batch_size=1", "train.grad_accum=2", "normalize=false"]) == 0
    assert rows == [4, 4, 4, 4]  # 2 steps x 2 micro-batches, no evaluation (no held-out groups), no normalisation
    stats = json.loads((tmp_path / "once" / "data_stats.json").read_text())
    assert (stats["train_groups"], stats["train_pairs"], stats["train_responses"]) == (4, 24, 16)
    first = json.loads((tmp_path / "once" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["supervised_tokens"] == 2  # the loop's unit count: groups of the step


# ---------------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------------
def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def fake_groups(sizes_and_pairs):
    """EncodedGroups with distinct dummy token ids: [(K, pairs), ...]."""
    from instructkit.data.preference import EncodedGroup

    return [EncodedGroup([1, 2], [[10 + gi, 20 + j] for j in range(k)], list(pairs), [0.0] * len(pairs))
            for gi, (k, pairs) in enumerate(sizes_and_pairs)]


def rewards_for(batch, per_group):
    """Rewards per batch row from per-group reward lists, following group_batch's slot-major row order."""
    rows = []
    for k in range(max(len(r) for r in per_group)):
        rows += [r[k] for r in per_group if k < len(r)]
    r = torch.tensor(rows, dtype=torch.float64)
    return r[batch["better"]], r[batch["worse"]]


def test_group_loss_by_hand():
    from instructkit.losses import kwise_reward_loss, pairwise_reward_loss
    from instructkit.recipes.reward_model import group_batch, group_loss

    k4 = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    batch = group_batch(fake_groups([(4, k4)]), 0)
    r = [2.0, 0.5, 0.0, -1.0]
    b, w = rewards_for(batch, [r])
    loss, sums = group_loss(b, w, batch)
    # diffs r_i - r_j over i < j: 1.5, 2, 3, 0.5, 1.5, 1; loss = mean softplus(-d)
    # = (0.2014133 + 0.1269280 + 0.0485874 + 0.4740770 + 0.2014133 + 0.3132617) / 6 = 1.3656807 / 6 = 0.2276135
    expected = sum(softplus(-d) for d in (1.5, 2, 3, 0.5, 1.5, 1)) / 6
    assert expected == pytest.approx(0.2276135, abs=1e-7)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    separate = [pairwise_reward_loss(torch.tensor([r[i]]), torch.tensor([r[j]]))[0].item() for i, j in k4]
    assert loss.item() == pytest.approx(sum(separate) / 6, abs=1e-7)
    assert loss.item() == pytest.approx(kwise_reward_loss(torch.tensor([r]))[0].item(), abs=1e-7)
    assert sums["accuracy"] == 6 and sums["reward_margin"] == pytest.approx(9.5)

    # Two groups: the K=4 one and a plain pair ordered wrongly (r = 0 vs 1: loss softplus(1) = 1.3132617).
    # Each group weighs the same: the micro-batch returns L_A + L_B, the step mean is (0.2276135 + 1.3132617) / 2 =
    # 0.7704376; weighting pairs instead would give (6 * 0.2276135 + 1.3132617) / 7 = 0.3827061.
    batch = group_batch(fake_groups([(4, k4), (2, [(0, 1)])]), 0)
    b, w = rewards_for(batch, [r, [0.0, 1.0]])
    loss, sums = group_loss(b, w, batch)
    assert batch["n"] == 2 and batch["n_pairs"] == 7
    assert loss.item() / batch["n"] == pytest.approx((expected + softplus(1)) / 2, abs=1e-9)
    assert loss.item() / batch["n"] == pytest.approx(0.7704376, abs=1e-7)
    assert sums["accuracy"] == 6  # 6 of 7 pairs ordered correctly


def test_group_loss_with_margin_and_partial_order():
    from instructkit.recipes.reward_model import group_batch, group_loss

    # a tie between responses 1 and 2 leaves 5 pairs; margins shift each difference: l = softplus(-(d - m))
    pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    groups = fake_groups([(4, pairs)])
    groups[0].margins = [1.0, 0.0, 0.5, 0.0, 2.0]
    batch = group_batch(groups, 0)
    r = [1.0, 0.0, 0.0, -1.0]
    b, w = rewards_for(batch, [r])
    loss, _ = group_loss(b, w, batch, use_margin=True)
    # d = 1, 1, 2, 1, 1; d - m = 0, 1, 1.5, 1, -1
    expected = (softplus(0) + softplus(-1) + softplus(-1.5) + softplus(-1) + softplus(1)) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert group_loss(b, w, batch)[0].item() == pytest.approx(sum(softplus(-d) for d in (1, 1, 2, 1, 1)) / 5, abs=1e-7)


def test_plain_pairs_give_the_pairwise_loss_bit_for_bit():
    """Groups of one pair: sum over groups == pairwise_reward_loss's mean x n, exactly (the pair path is unchanged)."""
    from instructkit.losses import pairwise_reward_loss
    from instructkit.recipes.reward_model import group_batch, group_loss

    torch.manual_seed(0)
    c, r = torch.randn(7), torch.randn(7)
    batch = group_batch(fake_groups([(2, [(0, 1)])] * 7), 0)
    b, w = rewards_for(batch, [[c[i].item(), r[i].item()] for i in range(7)])
    b, w = b.float(), w.float()
    assert torch.equal(b, c) and torch.equal(w, r)
    loss, _ = group_loss(b, w, batch)
    assert torch.equal(loss, pairwise_reward_loss(c, r)[0] * 7)


def test_grad_accumulation_over_groups_is_exact(tiny_model_dir, tiny_tokenizer):
    """Exact accumulation: 2 groups (K=4 and K=3, different lengths) in one micro-batch == 1 group x 2 micro-batches,
    fp64, 1e-6."""
    from instructkit.chat.render import Renderer
    from instructkit.models.value_head import load_sequence_classifier
    from instructkit.recipes.reward_model import group_batch, micro_batch_loss
    from instructkit.data.preference import encode_groups, group_pairs
    from instructkit.training.loop import optimizer_step

    pairs = convert_record(ranked_records(1, 5)[0], "ranked") + convert_record(
        {"prompt": "Say something longer, please.",
         "completions": [{"response": "Fine: here is a long and careful answer.", "score": 0.2},
                         {"response": "No.", "score": -1}, {"response": "Sure, here it is.", "score": 0.7}]}, "ranked")
    groups, _ = encode_groups(Renderer(tiny_tokenizer), group_pairs(pairs))
    assert [len(g.pairs) for g in groups] == [6, 3]
    torch.manual_seed(0)
    base, _ = load_sequence_classifier(tiny_model_dir, dtype=torch.float64)
    pad = tiny_tokenizer.pad_token_id
    results = []
    for layout in ([groups], [groups[:1], groups[1:]]):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        res = optimizer_step(model, opt, sched, [group_batch(g, pad) for g in layout], micro_batch_loss,
                             lambda b: b["n"])
        results.append((res.loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    before = dict(base.named_parameters())
    moved = max((params_a[n] - before[n]).abs().max().item() for n in params_a)
    assert moved > 1e-3  # the step did something (SGD, lr 1: the change is the gradient)
    for n in params_a:
        torch.testing.assert_close(params_a[n], params_b[n], rtol=0, atol=1e-6, msg=n)
    # and the step loss is the mean over the 2 groups of their mean pair losses
    with torch.no_grad():
        from instructkit.recipes.reward_model import group_loss, group_rewards

        per_group = [group_loss(*group_rewards(base, bt := group_batch([g], pad)), bt)[0].item() for g in groups]
    assert loss_a == pytest.approx(sum(per_group) / 2, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Validation split and learning through the CLI
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_split_never_puts_a_group_on_both_sides(tmp_path, seed):
    from instructkit.config import DataConfig
    from instructkit.recipes.reward_model import shared_groups, split_groups

    recs = ranked_records(30, seed) + [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    random.Random(seed).shuffle(recs)
    pairs = []
    for rec in recs:
        pairs += convert_record(rec, detect_format(rec))
    train, val, _ = split_groups(pairs, DataConfig(validation_fraction=0.3, seed=seed), tmp_path)
    assert len(val) == 12 and len(train) == 28  # round(40 * 0.3) groups, whatever their sizes
    ids = lambda gs: {p.meta.get("group", id(p)) for g in gs for p in g}  # noqa: E731
    assert not ids(train) & ids(val)
    assert sum(len(g) for g in train + val) == len(pairs) == 30 * 6 + 10
    assert all(len({p.meta.get("group", id(p)) for p in g}) == 1 for g in train + val)
    assert shared_groups(train, val) == 0
    ranked_groups = [g for g in train if "group" in g[0].meta]
    assert shared_groups(train, ranked_groups[:3] + val) == 3  # what a validation file repeating rankings reports


@pytest.fixture(scope="module")
def ranking_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranked_rm")
    src = write_lines(d / "ranked.jsonl", ranked_records(96, 0))
    assert cli(["reward-model", "--config", CONFIG, f"data.sources=[{{path: {src}}}]", "data.validation_fraction=0.25",
                f"train.output_dir={d}", "train.run_name=rm", "train.max_steps=20", "train.eval_every=10"]) == 0
    return d / "rm"


def test_cli_learns_a_k4_ranking(ranking_run):
    """Responses ranked by how often MARK occurs: >= 95% of held-out pairs ordered correctly after 20 steps."""
    result = json.loads((ranking_run / "summary.json").read_text())
    assert (result["eval_groups"], result["eval_pairs"]) == (24, 24 * 6)
    assert (result["train_groups"], result["train_pairs"]) == (72, 72 * 6)
    assert result["eval_accuracy"] >= 0.95
    steps = [json.loads(x) for x in (ranking_run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if "loss" in m]
    assert losses[0] > 0.5 and losses[-1] < 0.3  # starts near log 2 (random head), falls
    assert "eval_accuracy" in steps[9]  # eval_every=10
    stats = json.loads((ranking_run / "data_stats.json").read_text())
    assert stats["train_responses"] == 72 * 4 and stats["validation_groups"] == 24
    assert stats["groups_in_train_and_validation"] == 0


def test_trained_ranker_scores_by_the_rule(ranking_run):
    """The saved model (plain transformers) scores responses by their count of MARK, on new text."""
    from instructkit.chat.render import Renderer
    from instructkit.models.value_head import load_reward_model, sequence_scores
    from instructkit.data.preference import encode_response
    from instructkit.rl.rollout import prompt_response_batch

    model, tok, _ = load_reward_model(ranking_run / "final")
    renderer = Renderer(tok)
    prompt = [Message("user", "Tell me about a fox.")]
    enc = [encode_response(renderer, prompt, [Message("assistant", t)]) for t in
           ("It is good good good soft.", "It is good warm good old.", "It is loud good new tall.",
            "It is soft warm old new.")]
    with torch.no_grad():
        batch = prompt_response_batch([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id)
        s = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    assert s[0] > s[1] > s[2] > s[3]
