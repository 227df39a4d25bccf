"""PPO with a per-token KL penalty to the frozen SFT model: InstructGPT's RL stage (Ouyang et al. 2022; Ziegler et
al. 2019; Stiennon et al. 2020), with the details of Huang et al. 2024 ("The N+ implementation details of RLHF").

Phases: config -> models (policy from the SFT model; reference = a frozen copy, or the same base with the LoRA adapter
disabled; critic = a separate value model initialised from the reward model or the policy, or a value head on the
policy; reward = a reward model or a rule "module:function") -> prompts -> for each iteration: rollouts (generation
engine) -> scoring (old log-probs, reference log-probs, values, scores, missing-EOS penalty) -> KL-penalised per-token
rewards, GAE, whitening (rl/advantage.py) -> `ppo_epochs` passes of clipped policy + clipped value loss - entropy bonus
(+ PPO-ptx SFT loss) over mini-batches, each one optimizer step of training/loop.py (exact token-normalised
accumulation, clipping, non-finite guard) -> KL controller update -> metrics -> atomic checkpoint (exact resume: the
prompts, the sampling seeds and the mini-batch order are pure functions of the iteration).

Simplifications, said plainly: one response per prompt; the reward model must share the policy's tokenizer (true for
InstructGPT's same-backbone RM); dropout is off in rollouts and updates so the ratio is exactly 1 before the first
update (Huang et al. detail 2); ptx mini-batches are drawn in a seeded order and averaged per micro-batch.

``train.sharding: fsdp2`` and ``train.gradient_checkpointing`` (training/sharding.py, docs/distributed.md): the
actor-critic (policy, and the value head or the separate critic) is sharded as one FSDP root; the frozen reference copy
and the reward model stay whole in every process (their forwards need no collective). Rollouts are generated inside
``sharding.gathered``: every layer is all-gathered once per iteration and each process samples its rows alone. That is
the simplest correct design: a sharded forward is a collective, and lockstep generation would need every process to
run as many decode steps as the slowest row of any process, one all-gather per layer per token. The price is the full
weights in memory while generating. Scoring (one forward per process per iteration) and every update run through the
FSDP root (``sharding.route``); the updates run in lockstep (a process holding no row of a mini-batch takes an empty
pass). final/ is the policy, gathered into the same plain model folder (or adapter) as the unsharded run's.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import torch

from instructkit.config import ConfigError, PPOConfig
from instructkit.data.sources import read_sources
from instructkit.losses import (entropy_from_logits, entropy_from_logprobs, ppo_policy_loss, ppo_value_loss,
                                sft_loss)
from instructkit.models.value_head import (ActorCritic, ValueHead, disable_dropout, frozen_reference, gather_logprobs,
                                           load_reward_model, load_sequence_classifier, reference_logprobs,
                                           response_logits, sequence_scores)
from instructkit.rl.advantage import (AdaptiveKLController, FixedKLController, gae, kl_estimate,
                                      kl_penalized_rewards, length_adjusted_scores, masked_whiten,
                                      penalize_missing_eos)
from instructkit.rl.rollout import Trajectory, encode_prompts, load_reward_function, make_rollout_batch
from instructkit.training import sharding


def build_models(cfg: PPOConfig, run):
    """(actor-critic, reference or None, tokenizer, reward model or None, its (mean, std))."""
    from instructkit.models.load import apply_lora, load_model_and_tokenizer

    model_cfg = run.model_config()
    policy, tok = load_model_and_tokenizer(model_cfg, cfg.lora, precision=run.precision)
    reference = frozen_reference(policy, cfg.lora.enabled)  # with LoRA: the policy with its adapter disabled
    rm, norm = None, (0.0, 1.0)
    if cfg.reward_model:
        rm, rm_tok, norm = load_reward_model(run.resolve_model(cfg.reward_model))
        if rm_tok.get_vocab() != tok.get_vocab():
            raise ConfigError("the reward model's tokenizer differs from the policy's: PPO scores token ids directly")
    if cfg.value_model == "head":
        hidden = policy.get_input_embeddings().weight.shape[1]
        ac = ActorCritic(policy, value_head=ValueHead(hidden))
    else:
        critic, _ = load_sequence_classifier(run.resolve_model(cfg.reward_model) if cfg.reward_model
                                             else model_cfg.path)
        if cfg.lora.enabled:
            critic = apply_lora(critic, cfg.lora, task_type="SEQ_CLS")
        ac = ActorCritic(policy, critic=critic)
    return ac, reference, tok, rm, norm


def load_ptx(cfg: PPOConfig, renderer, run_dir: Path) -> list:
    """PPO-ptx: the pretraining-mix conversations (``ptx_data``) rendered into supervised samples."""
    from instructkit.training.packing import Sample

    convs, _ = read_sources(cfg.data, cfg.ptx_data, run_dir, expect="conversation")
    ptx = []
    for c in convs:
        r = renderer.render(c, mask=cfg.data.mask, max_length=cfg.data.max_length)
        if sum(r.loss_mask[1:]):
            ptx.append(Sample(list(r.input_ids), list(r.loss_mask)))
    if not ptx:
        raise ConfigError("ptx_data has no supervised tokens")
    return ptx


def ptx_micro_batch(ptx: list, rng: random.Random, cfg: PPOConfig, pad_id: int):
    """A seeded draw of ``ptx_micro_batch_size`` PPO-ptx samples as one padded batch (None without ptx_data)."""
    from instructkit.training.packing import collate_rows

    if not ptx:
        return None
    pick = rng.sample(range(len(ptx)), min(cfg.ptx_micro_batch_size, len(ptx)))
    return collate_rows([[ptx[i]] for i in pick], pad_id)


def scores_of(cfg: PPOConfig, rm, norm, reward_fn, rows: list[dict], outputs, batch) -> torch.Tensor:
    """(B,) sequence scores: the reward model's, normalised with its (mean, std), or the rule reward function's."""
    if rm is not None:
        return (sequence_scores(rm, batch["input_ids"], batch["attention_mask"]) - norm[0]) / norm[1]
    return torch.tensor(reward_fn([x["messages"] for x in rows], [o.text for o in outputs],
                                  [list(o.token_ids) for o in outputs], **cfg.reward_function_kwargs),
                        dtype=torch.float32)


# the update's statistics: token-weighted means over the micro-batches of every rank
UPDATE_KEYS = ("_n", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "ratio", "value_clipfrac",
               "explained_variance")


def ppo_loss(model: ActorCritic, mb, cfg: PPOConfig, sink: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """training/loop.py's loss function of one micro-batch (a Trajectory slice and an optional ptx batch): the
    clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy (+ ptx_coef * the SFT loss), token
    means times the token count (the loop divides by the step's tokens); the statistics go to ``sink[id(mb)]`` (keyed
    by micro-batch: a sharded filler pass repeats one and must not count twice)."""
    from instructkit.models.load import causal_lm_parts, packed_hidden_states

    traj, ptx_batch = mb
    model.eval()  # dropout stays off (it is zeroed anyway): gradients flow the same
    p, r = traj.prompt_width, traj.response_width
    logits, hidden = response_logits(model.policy, traj.input_ids, traj.attention_mask, p, r, cfg.temperature)
    tokens = traj.input_ids[:, p:p + r]
    mask = traj.response_mask
    logp_all = torch.log_softmax(logits, dim=-1)  # (b, R, V): the ratio's and the entropy's, computed once
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (b, R), = gather_logprobs(logits, tokens)
    pg, pg_m = ppo_policy_loss(logp, traj.logprobs, traj.advantages, mask, cfg.clip_range)
    values = model.values(hidden, traj.input_ids, traj.attention_mask, p, r)  # (b, R)
    vf, vf_m = ppo_value_loss(values, traj.values, traj.returns, mask, cfg.clip_range_value)
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.entropy_coef != 0):
        ent, _ = entropy_from_logprobs(logp_all, mask)  # with a zero coefficient: logged, no backward through it
    n = mask.sum()
    loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * ent
    stats = {"policy_loss": pg.item(), "value_loss": vf.item(), "entropy": ent.item(), **{
        k: float(v) for k, v in {**pg_m, **vf_m}.items()}}
    if ptx_batch is not None:
        body, head, softcap = causal_lm_parts(model.policy)
        s, k = sft_loss(packed_hidden_states(model.policy, ptx_batch), ptx_batch["labels"], head, softcap)
        ptx_mean = s / k.clamp(min=1)
        loss = loss + cfg.ptx_coef * ptx_mean
        stats["ptx_loss"] = ptx_mean.item()
    sink[id(mb)] = {k: v * float(n) for k, v in stats.items()} | {"_n": float(n)}
    return loss * n, n.long()


def iteration_record(step: int, traj: Trajectory, raw_scores: torch.Tensor, logits: torch.Tensor, kl_coef: float,
                     cfg: PPOConfig, dist, mb_stats: list[dict[str, float]], ptx: list) -> dict[str, Any]:
    """The metrics.jsonl line of one iteration: rollout statistics over the rows of every process (means over the
    rollout batch), then the update's token-weighted means over every micro-batch of every process."""
    mask, B = traj.response_mask, cfg.rollout_batch_size
    with torch.no_grad():
        ent_roll = entropy_from_logits(logits, mask)[0] * mask.sum()
        kl = (kl_estimate(traj.logprobs, traj.ref_logprobs, cfg.kl_estimator) * mask).sum(1)
    g = dist.sum_metrics([{
        "score": raw_scores.sum().item(), "score_penalized": traj.scores.sum().item(), "kl": kl.sum().item(),
        "reward_total": (traj.rewards * mask).sum().item(), "response_length": mask.sum().item(),
        "ended_fraction": traj.ended.float().sum().item(), "_tokens": mask.sum().item(),
        "rollout_entropy": ent_roll.item()}], B)
    rec: dict[str, Any] = {
        "step": step, "score": g["score"], "score_penalized": g["score_penalized"], "kl": g["kl"],
        "non_score_reward": -kl_coef * g["kl"], "reward_total": g["reward_total"], "kl_coef": kl_coef,
        "rollout_entropy": g["rollout_entropy"] / max(g["_tokens"], 1e-9), "response_length": g["response_length"],
        "ended_fraction": g["ended_fraction"]}
    upd = dist.sum_metrics(mb_stats, 1, UPDATE_KEYS + (("ptx_loss",) if ptx else ()))
    rec.update({k: v / max(upd["_n"], 1.0) for k, v in upd.items() if k != "_n"})
    return rec


def main(cfg: PPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.training.loop import read_metrics
    from instructkit.training.run import Run, data_fingerprint

    run = Run.start(cfg, "ppo", shardable=True)
    dist, B = run.dist, cfg.rollout_batch_size
    lo, hi = dist.rank * B // dist.world_size, (dist.rank + 1) * B // dist.world_size  # this rank's rows of a batch
    reduce = dist.all_reduce_sum if dist.world_size > 1 else None  # whitening statistics over every rank's rows

    # -- data (read and checked before the models are loaded)
    examples, read_stats = read_sources(cfg.data, cfg.data.sources, run.run_dir)

    # -- models
    ac, reference, tok, rm, rm_norm = build_models(cfg, run)
    disable_dropout(ac)
    policy = ac.policy  # the inner policy: generation
    model = run.prepare(ac)  # activation checkpointing, FSDP2 (the reference copy and the reward model stay whole)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    pad_id, stop_ids = tok.pad_token_id, renderer.stop_token_ids
    reward_fn = load_reward_function(cfg.reward_function) if cfg.reward_function else None
    engine = Engine(policy, tok, max_batch_size=B)

    # -- prompts, and the PPO-ptx conversations
    n_prompts = B // cfg.samples_per_prompt
    prompts, dropped = encode_prompts(examples, renderer, cfg.data.max_length, need=n_prompts, why=f"each rollout "
                                      f"batch (rollout_batch_size={B} / samples_per_prompt={cfg.samples_per_prompt})")
    run.check_data(read=read_stats, examples=len(examples), kept=len(prompts), dropped=dropped, unit="prompts")
    ptx = load_ptx(cfg, renderer, run.run_dir) if cfg.ptx_coef > 0 else []
    run.write_json("data_stats.json", {"read": read_stats, "prompts": len(prompts), "dropped": dropped,
                                       "ptx_examples": len(ptx)})

    # -- optimisation state: an iteration is one step of the run, its mini-batches are the optimizer's steps
    mini = cfg.train.micro_batch_size * cfg.train.grad_accum
    n_mini = B // mini
    iterations = cfg.train.max_steps or 1
    run.scheduler_steps = iterations * cfg.ppo_epochs * n_mini
    start = run.setup(model, total_steps=iterations, fingerprint=data_fingerprint([[x["ids"] for x in prompts], ptx]))
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl \
        else FixedKLController(cfg.kl_coef)
    if run.resumed_from is not None:
        kl_ctl.value = float(run.state["kl_coef"])
    mb_stats: list[dict[str, float]] = []
    step_stats: dict[int, dict[str, float]] = {}
    loss_fn = sharding.route(partial(ppo_loss, cfg=cfg, sink=step_stats))

    def score(m: ActorCritic, ids, attn, p: int, r: int):  # (B, R, V) logits, (B, R) reference log-probs and values
        logits, hidden = response_logits(m.policy, ids, attn, p, r, cfg.temperature)
        return logits, reference_logprobs(m.policy, reference, ids, attn, p, r, cfg.temperature), \
            m.values(hidden, ids, attn, p, r)

    # -- iterations
    for it in range(start, iterations):
        rng = random.Random(f"{cfg.data.seed}:{it}")
        chosen = [i for i in rng.sample(range(len(prompts)), n_prompts) for _ in range(cfg.samples_per_prompt)]
        rows = [prompts[i] for i in chosen[lo:hi]]

        # rollouts: this rank's rows; row i of the whole batch samples with seed base + i on any rank
        model.eval()
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                stop_token_ids=stop_ids, seed=cfg.train.seed * 1_000_003 + it + lo,
                                logprobs=False)  # the update recomputes them with the value head
        with sharding.gathered(model):  # every process; then each generates alone, no collective per token
            outputs = engine.generate([x["ids"] for x in rows], params)
        batch, ended = make_rollout_batch([x["ids"] for x in rows], outputs, stop_ids, pad_id)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        p, r, mask = batch["prompt_width"], batch["response_width"], batch["response_mask"]

        # scoring: old and reference log-probs, values, scores (missing-EOS penalty), KL-penalised rewards, GAE
        with torch.no_grad():  # one forward per process: the same on every process under sharding
            logits, ref_logp, values = sharding.route(score)(model, ids, attn, p, r)
            old_logp = gather_logprobs(logits, ids[:, p:p + r]) * mask
            values = values * mask
            raw_scores = scores_of(cfg, rm, rm_norm, reward_fn, rows, outputs, batch)
            scores = penalize_missing_eos(length_adjusted_scores(raw_scores, mask, cfg.length_reward), ended,
                                          cfg.missing_eos_penalty)
            rewards, _ = kl_penalized_rewards(old_logp, ref_logp, mask, scores, kl_ctl.value, cfg.kl_estimator)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce_sum=reduce)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask, all_reduce_sum=reduce)  # the whole rollout batch, all ranks
        traj = Trajectory(ids, attn, mask, p, r, old_logp, ref_logp, values, scores, ended, rewards, advantages,
                          returns)

        # PPO epochs over mini-batches, each an optimizer step; this rank updates on its rows of each mini-batch
        mb_stats.clear()
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + it)
        grad_norms = []
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=gen)
            for k in range(n_mini):
                # rows in rollout order within a mini-batch: the same rows in the same order as scoring gives the
                # same floating-point sums (a permuted batch differs by ~1e-7), so the first update's ratio is exactly 1
                idx = perm[k * mini:(k + 1) * mini].sort().values
                mine = idx[(idx >= lo) & (idx < hi)] - lo
                micro = [(traj.select(mine[j:j + cfg.train.micro_batch_size]), ptx_micro_batch(ptx, rng, cfg, pad_id))
                         for j in range(0, len(mine), cfg.train.micro_batch_size)]
                if not micro and sharding.is_sharded(model):  # no row here: an empty pass keeps the lockstep
                    empty = traj.select(torch.zeros(1, dtype=torch.long))
                    empty.response_mask = torch.zeros_like(empty.response_mask)
                    micro = [(empty, None)]
                step_stats.clear()
                res = run.optimizer_step(micro, loss_fn, lambda mb: int(mb[0].response_mask.sum()), step=it)
                mb_stats.extend(step_stats[id(mb)] for mb in micro if id(mb) in step_stats)
                if res.grad_norm is not None:
                    grad_norms.append(res.grad_norm)

        # metrics, the KL controller's update, checkpoint, samples
        rec = iteration_record(it + 1, traj, raw_scores, logits, kl_ctl.value, cfg, dist, mb_stats, ptx)
        rec.update(lr=run.scheduler.get_last_lr()[0], grad_norm=sum(grad_norms) / max(len(grad_norms), 1))
        kl_ctl.update(rec["kl"], B)
        run.after_step(it + 1, rec, state={"kl_coef": kl_ctl.value})
        if it == 0 or it + 1 == iterations:
            run.write_samples(it + 1, [{"prompt": x["messages"], "response": o.text, "score": s.item()}
                                       for x, o, s in list(zip(rows, outputs, raw_scores))[:4]])

    records = read_metrics(run.run_dir) if run.is_main else []
    return run.finish(model, tok, {
        "iterations": iterations,
        "first": {k: records[0].get(k) for k in ("score", "kl", "response_length")} if records else {},
        "last": {k: records[-1].get(k) for k in ("score", "kl", "response_length", "kl_coef")} if records else {}},
        template=renderer.template, part="policy")
