"""The InstructGPT pipeline (Ouyang et al. 2022) as one experiment: SFT -> reward model -> PPO -> SFT-vs-PPO report.

`instructkit experiment instructgpt --config configs/instructgpt.yaml [key.sub=value ...]`. Phases, in order:
  1. config: one InstructGPTConfig with a section per stage; the pipeline sets each stage's run folder
     (<out>/sft, <out>/reward_model, <out>/ppo), the RM's and PPO's starting model (the SFT output, LoRA merged) and
     PPO's reward model (the stage-2 output). With `synthetic_prompts` the training data is a synthetic rule (below).
  2. stages: each is the existing recipe's `main` (recipes/sft.py, reward_model.py, ppo.py), never a copy. A stage whose
     summary.json exists (every recipe writes it last, after final/: training/run.py's one layout) is skipped,
     so a killed pipeline continues; inside a stage, the recipe's own checkpoints resume it (train.resume: auto).
  3. comparison on held-out prompts: both policies answer the same prompts with the same sampling seed (generation
     engine); the stage-2 reward model scores prompt + response token ids exactly as PPO scored its rollouts
     (normalised with the RM's stored mean/std); win rate of PPO over SFT (ties count half); KL to the SFT model on the
     PPO policy's responses; response lengths; fraction that end their turn.
  4. report: results.json, report.md (numbers from the same dict), reward and KL curves over PPO iterations
     (eval/report.py plots the PPO run's metrics.jsonl) and sample responses side by side.

KL(pi_ppo || pi_sft) is reported two ways, both on the PPO policy's responses y ~ pi_ppo:
  * log-ratio (Schulman's k1): sum_t [log pi_ppo(y_t | x, y_<t) - log pi_sft(y_t | x, y_<t)], what PPO penalised;
    unbiased for the sequence KL when the responses are sampled at temperature 1, but it can be negative per sample.
  * exact per-position KL: sum_t sum_v pi_ppo(v | .) (log pi_ppo(v | .) - log pi_sft(v | .)), >= 0 at every position;
    summed over positions it is a lower-variance unbiased estimate of the same sequence KL (Rao-Blackwellised k1).
With greedy responses (eval_temperature 0) both are statistics of the greedy path, not estimates of the KL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from instructkit.config import (PIPELINE_REWARD_MODEL, ConfigError, DataSource, InstructGPTConfig, apply_overrides,
                                from_dict, resolve_source_paths, save_config)

log = logging.getLogger(__name__)

# The synthetic rule for smoke runs: a demonstration answers in one of two styles; preferences always favour GOOD.
# Both are short (they end well within a tiny PPO budget) and differ from their first token, so the policy's choice of
# style is one decision PPO can move.
GOOD_RESPONSE = "Happy to help."
BAD_RESPONSE = "No."
SYNTHETIC_PROMPT_CHARS = 80


# ---------------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------------
def load_instructgpt_config(path: str | Path | None, overrides: list[str] | None = None) -> InstructGPTConfig:
    """YAML + dotted overrides -> InstructGPTConfig. `ppo.reward_model` may be left out: it is the pipeline's own RM
    (PPOConfig alone would refuse a config without a reward)."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        resolve_source_paths(data, p.resolve().parent)  # every stage's sources and eval_prompts, as load_config does
    apply_overrides(data, overrides or [])
    ppo = data.setdefault("ppo", {})
    if not isinstance(ppo, dict):
        raise ConfigError("ppo: expected a mapping")
    if not ppo.get("reward_function"):
        ppo.setdefault("reward_model", PIPELINE_REWARD_MODEL)
    try:
        return from_dict(InstructGPTConfig, data)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def _stage_train(train, out: Path, name: str):
    return dataclasses.replace(train, output_dir=str(out), run_name=name)


# ---------------------------------------------------------------------------------------------------------------------
# synthetic data (smoke runs)
# ---------------------------------------------------------------------------------------------------------------------
def write_synthetic_data(cfg: InstructGPTConfig, data_dir: Path) -> dict[str, Path]:
    """sft.jsonl (half GOOD, half BAD answers), pairs.jsonl (GOOD over BAD) and heldout.jsonl (pairs too: only their
    prompts are used) from the prompts of
    `synthetic_prompts` (first user turn, cut to SYNTHETIC_PROMPT_CHARS characters, duplicates dropped)."""
    from instructkit.data.io import read_examples, write_jsonl
    from instructkit.data.schema import Conversation, Message, PreferencePair
    from instructkit.data.sources import prompt_messages_of

    texts: list[str] = []
    for ex in read_examples(cfg.synthetic_prompts):
        users = [m.content for m in prompt_messages_of(ex) if m.role == "user"]
        text = users[0][:SYNTHETIC_PROMPT_CHARS].strip() if users else ""
        if text and text not in texts:
            texts.append(text)
    if len(texts) <= cfg.synthetic_heldout + 1:
        raise ConfigError(f"{cfg.synthetic_prompts}: {len(texts)} distinct prompts, need more than "
                          f"synthetic_heldout={cfg.synthetic_heldout} + 1")
    train, held = texts[: -cfg.synthetic_heldout], texts[-cfg.synthetic_heldout:]
    styles = [GOOD_RESPONSE, BAD_RESPONSE] * (len(train) // 2 + 1)
    random.Random(cfg.sft.data.seed).shuffle(styles)
    user = lambda t: [Message("user", t)]  # noqa: E731
    meta = {"synthetic": "instructgpt good/bad rule"}
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: data_dir / f"{k}.jsonl" for k in ("sft", "pairs", "heldout")}
    write_jsonl(paths["sft"], [Conversation(user(t) + [Message("assistant", s)], meta) for t, s in zip(train, styles)])
    write_jsonl(paths["pairs"], [PreferencePair(user(t), [Message("assistant", GOOD_RESPONSE)],
                                                [Message("assistant", BAD_RESPONSE)], meta) for t in train])
    write_jsonl(paths["heldout"], [PreferencePair(user(t), [Message("assistant", GOOD_RESPONSE)],
                                                  [Message("assistant", BAD_RESPONSE)], meta) for t in held])
    return paths


def _with_sources(section, path: Path):
    return dataclasses.replace(section, data=dataclasses.replace(section.data, sources=[DataSource(path=str(path))]))


# ---------------------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------------------
def _run_stage(name: str, run_dir: Path, done_file: str, fn) -> dict:
    done = run_dir / done_file
    if done.exists():
        log.warning("stage %s already finished (%s): skipped", name, done)
        return json.loads(done.read_text(encoding="utf-8"))
    log.warning("stage %s: running into %s", name, run_dir)
    return fn()


def plain_model_dir(model_dir: Path, merged_dir: Path) -> Path:
    """A LoRA adapter folder merged into its base (once, into `merged_dir`); a full model folder as it is."""
    if not (model_dir / "adapter_config.json").exists():
        return model_dir
    if not (merged_dir / "config.json").exists():
        from instructkit.models.load import merge_and_save

        merge_and_save(model_dir, merged_dir)
    return merged_dir


# ---------------------------------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------------------------------
def load_heldout_prompts(cfg: InstructGPTConfig, run_dir: Path, synthetic_heldout: Path | None) -> list[list[dict]]:
    from instructkit.config import DataConfig
    from instructkit.data.sources import prompt_messages_of, read_sources

    sources = [DataSource(path=str(synthetic_heldout))] if synthetic_heldout else cfg.eval_prompts
    if synthetic_heldout is None and cfg.eval_offset:  # each source's slice starts eval_offset examples later
        sources = [dataclasses.replace(s, skip=s.skip + cfg.eval_offset) for s in sources]
    eval_dir = run_dir / "eval_prompts"  # rejects_<i>.jsonl of skipped records
    eval_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = DataConfig(skip_invalid=cfg.eval_skip_invalid, max_invalid_fraction=cfg.eval_max_invalid_fraction)
    examples, stats = read_sources(data_cfg, sources, eval_dir)
    rejected = sum(v["rejected"] for v in stats.values())
    if rejected:
        log.warning("held-out prompts: %d invalid records skipped (reasons in %s)", rejected, eval_dir)
    prompts = [[{"role": m.role, "content": m.content} for m in prompt_messages_of(ex)] for ex in examples]
    prompts = [p for p in prompts if p]
    if cfg.eval_max_prompts:
        prompts = prompts[: cfg.eval_max_prompts]
    if not prompts:
        raise ConfigError("no held-out prompts for the comparison (check eval_prompts and eval_offset)")
    return prompts


def win_rate(scores_a: list[float], scores_b: list[float]) -> dict[str, Any]:
    """A over B per prompt: win 1, tie 0.5, loss 0 (eval/reward.py's summary: win rate = (wins + ties / 2) / n)."""
    from instructkit.eval.reward import win_rate_summary

    return win_rate_summary([1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores_a, scores_b)])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


@torch.no_grad()
def kl_to_reference(policy, reference, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) per-token log-ratio log pi(y_t) - log pi_ref(y_t), and (B, R) exact KL(pi(.|ctx) || pi_ref(.|ctx)) at each
    response position; both 0 outside the response mask. Temperature 1: the policies' own distributions."""
    from instructkit.models.value_head import gather_logprobs, response_logits

    ids, attn, p, r = batch["input_ids"], batch["attention_mask"], batch["prompt_width"], batch["response_width"]
    mask = batch["response_mask"]  # (B, R)
    lp = torch.log_softmax(response_logits(policy, ids, attn, p, r)[0], -1)  # (B, R, V)
    lq = torch.log_softmax(response_logits(reference, ids, attn, p, r)[0], -1)  # (B, R, V)
    tokens = ids[:, p:p + r]
    log_ratio = (gather_logprobs(lp, tokens) - gather_logprobs(lq, tokens)) * mask  # log_softmax is idempotent
    exact = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0.0) * mask  # (B, R); clamp: fp rounding only
    return log_ratio, exact


def compare_policies(cfg: InstructGPTConfig, sft_dir: Path, ppo_dir: Path, rm_dir: Path,
                     prompts: list[list[dict]]) -> dict[str, Any]:
    """Generate from both policies on the same prompts and seed; score, compare, measure KL (module docstring)."""
    from instructkit.chat.render import Renderer
    from instructkit.config import ModelConfig
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.models.value_head import load_reward_model, sequence_scores
    from instructkit.rl.rollout import make_rollout_batch

    template = cfg.sft.model.template
    sft, tok = load_model_and_tokenizer(ModelConfig(path=str(sft_dir), template=template))
    ppo, _ = load_model_and_tokenizer(ModelConfig(path=str(ppo_dir), template=template))
    rm, rm_tok, (rm_mean, rm_std) = load_reward_model(rm_dir)
    if rm_tok.get_vocab() != tok.get_vocab():
        raise ConfigError("the reward model's tokenizer differs from the policy's")
    judge = None
    if cfg.judge_reward_model:
        judge, judge_tok, (judge_mean, judge_std) = load_reward_model(cfg.judge_reward_model)
        if judge_tok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"judge_reward_model {cfg.judge_reward_model}: its tokenizer differs from the policy's "
                              "(it scores the policies' token ids as the stage-2 reward model does)")
    sft.eval()
    ppo.eval()
    renderer = Renderer(tok, template=template)
    stop_ids = renderer.stop_token_ids
    prompt_ids = [renderer.render_prompt(m) for m in prompts]
    params = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens, temperature=cfg.eval_temperature,
                            stop_token_ids=stop_ids, seed=cfg.eval_seed, logprobs=False)
    bs = cfg.eval_batch_size
    per_policy: dict[str, dict[str, Any]] = {}
    kl_tok_sum, kl_tok_n, kl_seq, kl_exact_seq = 0.0, 0, [], []
    for name, model in (("sft", sft), ("ppo", ppo)):
        outputs = Engine(model, tok, max_batch_size=bs).generate(prompt_ids, params)
        scores, judge_scores, ended, lengths = [], [], [], []
        for s in range(0, len(prompt_ids), bs):
            batch, end = make_rollout_batch(prompt_ids[s:s + bs], outputs[s:s + bs], stop_ids, tok.pad_token_id)
            with torch.no_grad():
                raw = sequence_scores(rm, batch["input_ids"], batch["attention_mask"])  # (b,)
                if judge is not None:
                    judged = sequence_scores(judge, batch["input_ids"], batch["attention_mask"])  # (b,)
                    judge_scores += ((judged - judge_mean) / judge_std).tolist()
            scores += ((raw - rm_mean) / rm_std).tolist()  # as PPO normalised its scores
            ended += end.tolist()
            lengths += batch["response_mask"].sum(1).long().tolist()
            if name == "ppo":  # KL of the PPO policy to the SFT model, on the PPO policy's responses
                log_ratio, exact = kl_to_reference(ppo, sft, batch)
                kl_tok_sum += log_ratio.sum().item()
                kl_tok_n += int(batch["response_mask"].sum().item())
                kl_seq += log_ratio.sum(1).tolist()
                kl_exact_seq += exact.sum(1).tolist()
        mean, std = _mean_std(scores)
        per_policy[name] = {
            "reward_mean": mean, "reward_std": std, "response_length_mean": sum(lengths) / len(lengths),
            "ended_fraction": sum(ended) / len(ended), "scores": scores, "lengths": lengths,
            "responses": [o.text for o in outputs], "ended": [bool(e) for e in ended]}
        if judge is not None:
            per_policy[name]["judge_reward_mean"] = _mean_std(judge_scores)[0]
            per_policy[name]["judge_scores"] = judge_scores
    kl = {
        "kl_per_token": kl_tok_sum / max(kl_tok_n, 1),
        "kl_per_sequence": sum(kl_seq) / len(kl_seq),
        "kl_exact_per_token": sum(kl_exact_seq) / max(kl_tok_n, 1),
        "kl_exact_per_sequence": sum(kl_exact_seq) / len(kl_exact_seq),
        "kl_per_sequence_values": kl_seq,
    }
    out = {"prompts": prompts, "policies": per_policy, "kl": kl,
           "winrate": win_rate(per_policy["ppo"]["scores"], per_policy["sft"]["scores"])}
    if judge is not None:
        out["judge_winrate"] = win_rate(per_policy["ppo"]["judge_scores"], per_policy["sft"]["judge_scores"])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
def summary_numbers(cmp: dict[str, Any]) -> dict[str, float]:
    """The headline numbers, flat: what results.json stores under "summary" and report.md shows (4 decimals)."""
    out: dict[str, float] = {}
    for name in ("sft", "ppo"):
        for k in ("reward_mean", "reward_std", "response_length_mean", "ended_fraction"):
            out[f"{name}.{k}"] = cmp["policies"][name][k]
    for k in ("winrate", "wins", "ties", "losses", "n"):
        out[f"ppo_vs_sft.{k}"] = cmp["winrate"][k]
    for k in ("kl_per_token", "kl_per_sequence", "kl_exact_per_token", "kl_exact_per_sequence"):
        out[f"ppo_vs_sft.{k}"] = cmp["kl"][k]
    if "judge_winrate" in cmp:
        for name in ("sft", "ppo"):
            out[f"{name}.judge_reward_mean"] = cmp["policies"][name]["judge_reward_mean"]
        for k in ("winrate", "wins", "ties", "losses"):
            out[f"ppo_vs_sft.judge_{k}"] = cmp["judge_winrate"][k]
    return out


def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_markdown(cfg: InstructGPTConfig, results: dict[str, Any], plots: dict[str, str]) -> str:
    s = results["summary"]
    sampling = "greedy" if cfg.eval_temperature == 0 else f"sampled at temperature {cfg.eval_temperature}"
    lines = [f"# InstructGPT pipeline: SFT vs PPO ({cfg.run_name})", "",
             f"Base model `{cfg.sft.model.path}`; stages in `sft/`, `reward_model/`, `ppo/`. "
             f"{int(s['ppo_vs_sft.n'])} held-out prompts, responses {sampling}, at most {cfg.eval_max_new_tokens} "
             f"tokens, the same seed for both policies. Rewards are the stage-2 reward model's normalised scores.", "",
             "| metric | SFT | PPO |", "|---|---|---|"]
    judged = "ppo_vs_sft.judge_winrate" in s
    rows = (("reward_mean", "reward (mean)"), ("reward_std", "reward (std)"),
            ("response_length_mean", "response length (tokens, mean)"),
            ("ended_fraction", "fraction ending with end-of-turn"))
    for k, label in rows + ((("judge_reward_mean", "held-out judge's reward (mean)"),) if judged else ()):
        lines.append(f"| {label} | {_fmt(s['sft.' + k])} | {_fmt(s['ppo.' + k])} |")
    lines += ["", "| PPO vs SFT | value |", "|---|---|"]
    judge_rows = ((("judge_winrate", "win rate under the held-out judge (ties count half)"),
                   ("judge_wins", "judge: wins"), ("judge_ties", "judge: ties"), ("judge_losses", "judge: losses"))
                  if judged else ())
    for k, label in (("winrate", "win rate under the RM (ties count half)"), ("wins", "wins"), ("ties", "ties"),
                     ("losses", "losses"), *judge_rows, ("kl_per_token", "KL per token (log-ratio, k1)"),
                     ("kl_per_sequence", "KL per sequence (log-ratio, k1)"),
                     ("kl_exact_per_token", "KL per token (exact over the vocabulary)"),
                     ("kl_exact_per_sequence", "KL per sequence (exact over the vocabulary)")):
        lines.append(f"| {label} | {_fmt(s['ppo_vs_sft.' + k])} |")
    lines += ["", "KL(pi_ppo || pi_sft) is measured on the PPO policy's responses; see recipes/instructgpt.py for the "
              "two estimators.", ""]
    if judged:
        lines += [f"The held-out judge is `{cfg.judge_reward_model}`, a reward model trained on other preference data "
                  "than the stage-2 RM that PPO optimised; its normalised scores rank the same responses.", ""]
    stages = results["stages"]
    ppo_first, ppo_last = stages["ppo"].get("first") or {}, stages["ppo"].get("last") or {}
    lines += ["## Stages", "",
              f"- SFT: {stages['sft'].get('steps')} steps, loss {_fmt_opt(stages['sft'].get('first_loss'))} -> "
              f"{_fmt_opt(stages['sft'].get('last_loss'))}",
              f"- reward model: {stages['reward_model'].get('steps')} steps, held-out accuracy "
              f"{_fmt_opt(stages['reward_model'].get('eval_accuracy'))}",
              f"- PPO: {stages['ppo'].get('iterations')} iterations, rollout score {_fmt_opt(ppo_first.get('score'))} "
              f"-> {_fmt_opt(ppo_last.get('score'))}, KL {_fmt_opt(ppo_first.get('kl'))} -> "
              f"{_fmt_opt(ppo_last.get('kl'))}", ""]
    for key, path in plots.items():
        lines += [f"![{key} over PPO iterations]({path})", ""]
    lines += ["## Samples", "", "| prompt | SFT | PPO |", "|---|---|---|"]
    for smp in results["samples"]:
        lines.append(f"| {_cell(smp['prompt'])} | {_cell(smp['sft'])} (r={smp['sft_reward']:.3f}) | "
                     f"{_cell(smp['ppo'])} (r={smp['ppo_reward']:.3f}) |")
    return "\n".join(lines) + "\n"


def _fmt_opt(v: Any) -> str:
    return "-" if v is None else _fmt(v)


def write_report(cfg: InstructGPTConfig, out: Path, cmp: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any]:
    from instructkit.eval.report import load_run, plot_curves

    plots: dict[str, str] = {}
    ppo_run = load_run(out / "ppo", name="PPO")
    for key in ("score", "kl"):
        png = plot_curves([ppo_run], key, out / f"ppo_{key}.png")
        if png is not None:
            plots[key] = Path(png).name
    pol = cmp["policies"]
    samples = [{"prompt": cmp["prompts"][i][-1]["content"], "sft": pol["sft"]["responses"][i],
                "ppo": pol["ppo"]["responses"][i], "sft_reward": pol["sft"]["scores"][i],
                "ppo_reward": pol["ppo"]["scores"][i]} for i in range(min(cfg.num_samples, len(cmp["prompts"])))]
    results = {"summary": summary_numbers(cmp), "winrate": cmp["winrate"], "kl": cmp["kl"],
               "policies": {k: {kk: vv for kk, vv in v.items()} for k, v in pol.items()},
               "stages": stages, "plots": plots, "samples": samples}
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(cfg, results, plots), encoding="utf-8")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: InstructGPTConfig) -> dict[str, Any]:
    from instructkit.recipes import ppo as ppo_recipe
    from instructkit.recipes import reward_model as rm_recipe
    from instructkit.recipes import sft as sft_recipe

    # -- 1. config
    out = (Path(cfg.output_dir) / cfg.run_name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    sft_cfg, rm_cfg, ppo_cfg = cfg.sft, cfg.reward_model, cfg.ppo
    heldout_file = None
    if cfg.synthetic_prompts:
        paths = write_synthetic_data(cfg, out / "data")
        sft_cfg, rm_cfg = _with_sources(sft_cfg, paths["sft"]), _with_sources(rm_cfg, paths["pairs"])
        ppo_cfg, heldout_file = _with_sources(ppo_cfg, paths["pairs"]), paths["heldout"]
    if cfg.ppo.reward_model != PIPELINE_REWARD_MODEL:
        log.warning("ppo.reward_model=%s is replaced by the pipeline's reward model", cfg.ppo.reward_model)

    # -- 2. stages
    sft_cfg = dataclasses.replace(sft_cfg, train=_stage_train(sft_cfg.train, out, "sft"))
    sft_summary = _run_stage("sft", out / "sft", "summary.json", lambda: sft_recipe.main(sft_cfg))
    sft_dir = plain_model_dir(out / "sft" / "final", out / "sft" / "merged")

    rm_cfg = dataclasses.replace(rm_cfg, model=dataclasses.replace(rm_cfg.model, path=str(sft_dir)),
                                 train=_stage_train(rm_cfg.train, out, "reward_model"))
    rm_summary = _run_stage("reward_model", out / "reward_model", "summary.json", lambda: rm_recipe.main(rm_cfg))
    rm_dir = out / "reward_model" / "final"

    ppo_cfg = dataclasses.replace(ppo_cfg, model=dataclasses.replace(ppo_cfg.model, path=str(sft_dir)),
                                  reward_model=str(rm_dir), train=_stage_train(ppo_cfg.train, out, "ppo"))
    ppo_summary = _run_stage("ppo", out / "ppo", "summary.json", lambda: ppo_recipe.main(ppo_cfg))
    ppo_dir = plain_model_dir(out / "ppo" / "final", out / "ppo" / "merged")

    # -- 3. comparison and 4. report
    prompts = load_heldout_prompts(cfg, out, heldout_file)
    cmp = compare_policies(cfg, sft_dir, ppo_dir, rm_dir, prompts)
    stages = {"sft": sft_summary, "reward_model": rm_summary, "ppo": ppo_summary}
    results = write_report(cfg, out, cmp, stages)
    return {"report": str(out / "report.md"), "results": str(out / "results.json"), "summary": results["summary"]}
