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
"""

from __future__ import annotations

import copy
import json
import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructkit.config import ConfigError, PPOConfig
from instructkit.data.sources import prompt_messages_of, read_sources
from instructkit.losses import (entropy_from_logits, entropy_from_logprobs, ppo_policy_loss, ppo_value_loss,
                                sft_loss)
from instructkit.models.value_head import (ValueHead, gather_logprobs, load_reward_model, load_sequence_classifier,
                                           response_logits, sequence_scores, token_scores)
from instructkit.rl.advantage import (AdaptiveKLController, FixedKLController, gae, kl_estimate,
                                      kl_penalized_rewards, masked_whiten, penalize_missing_eos)
from instructkit.rl.rollout import Trajectory, load_reward_function, make_rollout_batch

log = logging.getLogger(__name__)


class ActorCritic(nn.Module):
    """Policy plus critic in one module, so the shared optimizer and checkpoint code see every trainable parameter."""

    def __init__(self, policy, value_head: ValueHead | None = None, critic=None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    def values(self, batch_like, hidden: torch.Tensor) -> torch.Tensor:
        """(B, R) value of the state before each response token."""
        if self.value_head is not None:
            return self.value_head(hidden)
        p, r = batch_like.prompt_width, batch_like.response_width
        return token_scores(self.critic, batch_like.input_ids, batch_like.attention_mask, p - 1, r)


def build_models(cfg: PPOConfig, run):
    """(actor-critic, reference or None, tokenizer, reward model or None, its (mean, std))."""
    from instructkit.models.load import apply_lora, load_model_and_tokenizer

    model_cfg = run.model_config()
    policy, tok = load_model_and_tokenizer(model_cfg, cfg.lora, precision=run.precision)
    reference = None
    if not cfg.lora.enabled:  # with LoRA the reference is the policy with its adapter disabled
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
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


def _no_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def encode_prompts(examples: list, renderer, cfg: PPOConfig) -> tuple[list[list[int]], list[list[dict]], dict]:
    """Prompt token ids (and messages) of conversations or pairs, and what was dropped by reason (no prompt,
    longer than data.max_length)."""
    ids, msgs, dropped = [], [], {"too_long": 0, "no_prompt": 0}
    for ex in examples:
        m = prompt_messages_of(ex)
        if not m:
            dropped["no_prompt"] += 1
            continue
        p = renderer.render_prompt(m, tools=getattr(ex, "tools", None))  # the example's tools, as SFT renders them
        if len(p) > cfg.data.max_length:
            dropped["too_long"] += 1
            continue
        ids.append(p)
        msgs.append([x.to_dict() for x in m])  # every field (tool calls, reasoning) for rule rewards
    return ids, msgs, dropped


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


# the update's statistics: token-weighted means over the micro-batches of every rank
UPDATE_KEYS = ("_n", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "ratio", "value_clipfrac",
               "explained_variance")


def ppo_loss(model: ActorCritic, mb, cfg: PPOConfig, sink: list) -> tuple[torch.Tensor, torch.Tensor]:
    """training/loop.py's loss function of one micro-batch (a Trajectory slice and an optional ptx batch): the
    clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy (+ ptx_coef * the SFT loss), token
    means times the token count (the loop divides by the step's tokens); the statistics go to ``sink``."""
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
    values = model.values(traj, hidden)  # (b, R)
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
    sink.append({k: v * float(n) for k, v in stats.items()} | {"_n": float(n)})
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


def whiten(x: torch.Tensor, mask: torch.Tensor, dist, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """rl.advantage.masked_whiten over the rollouts of every process: the mean and the (Bessel-corrected) variance are
    taken over the masked positions of all ranks' rows (sums reduced across processes). Shapes: (B, T)."""
    if dist.world_size == 1:
        return masked_whiten(x, mask, shift_mean, eps)
    s = dist.all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).double())
    mean = s[0] / s[1]
    centred = x - mean.to(x.dtype)
    v = dist.all_reduce_sum((centred * centred * mask).sum().double().reshape(1))[0] / s[1]
    if s[1] > 1:
        v = v * s[1] / (s[1] - 1)
    out = centred * torch.rsqrt(v + eps).to(x.dtype)
    return (out + mean.to(x.dtype) if not shift_mean else out) * mask


def main(cfg: PPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.training.loop import read_metrics
    from instructkit.training.packing import collate_rows
    from instructkit.training.run import Run, data_fingerprint

    if cfg.temperature <= 0:
        raise ConfigError("PPO samples: temperature must be > 0")
    run = Run.start(cfg, "ppo")
    run_dir, dist = run.run_dir, run.dist
    B, W = cfg.rollout_batch_size, dist.world_size
    lo, hi = dist.rank * B // W, (dist.rank + 1) * B // W  # this rank's rows of every rollout batch

    # -- data (read and checked before the models are loaded)
    examples, read_stats = read_sources(cfg.data, cfg.data.sources, run_dir)

    # -- models
    ac, reference, tok, rm, (rm_mean, rm_std) = build_models(cfg, run)
    _no_dropout(ac)
    policy = ac.policy
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    pad_id = tok.pad_token_id
    stop_ids = renderer.stop_token_ids
    reward_fn = load_reward_function(cfg.reward_function) if cfg.reward_function else None
    engine = Engine(policy, tok, max_batch_size=cfg.rollout_batch_size)

    # -- prompts
    prompt_ids, prompt_msgs, dropped = encode_prompts(examples, renderer, cfg)
    run.check_data(read=read_stats, examples=len(examples), kept=len(prompt_ids), dropped=dropped, unit="prompts")
    data_stats = {"read": read_stats, "prompts": len(prompt_ids), "dropped": dropped}
    n_prompts = B // cfg.samples_per_prompt
    if len(prompt_ids) < n_prompts:
        from instructkit.data.schema import DataError

        raise DataError(f"{len(prompt_ids)} usable prompts, fewer than the {n_prompts} of each rollout batch "
                        f"(rollout_batch_size={B} / samples_per_prompt={cfg.samples_per_prompt})")
    ptx = load_ptx(cfg, renderer, run_dir) if cfg.ptx_coef > 0 else []
    data_stats["ptx_examples"] = len(ptx)
    if run.is_main:
        (run_dir / "data_stats.json").write_text(json.dumps(data_stats, indent=1, default=str))

    # -- optimisation state: an iteration is one step of the run, its mini-batches are the optimizer's steps
    mini = cfg.train.micro_batch_size * cfg.train.grad_accum
    n_mini = B // mini
    iterations = cfg.train.max_steps or 1
    run.scheduler_steps = iterations * cfg.ppo_epochs * n_mini
    start = run.setup(ac, total_steps=iterations, fingerprint=data_fingerprint([prompt_ids, ptx]))
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl \
        else FixedKLController(cfg.kl_coef)
    if run.resumed_from is not None:
        kl_ctl.value = float(run.state["kl_coef"])

    def reference_logits(input_ids, attention_mask, p, r):
        if reference is not None:
            return response_logits(reference, input_ids, attention_mask, p, r, cfg.temperature)[0]
        with policy.disable_adapter():
            return response_logits(policy, input_ids, attention_mask, p, r, cfg.temperature)[0]

    mb_stats: list[dict[str, float]] = []

    loss_fn = partial(ppo_loss, cfg=cfg, sink=mb_stats)

    # -- iterations
    for it in range(start, iterations):
        rng = random.Random(f"{cfg.data.seed}:{it}")
        chosen = [i for i in rng.sample(range(len(prompt_ids)), n_prompts) for _ in range(cfg.samples_per_prompt)]
        batch_prompts = [prompt_ids[i] for i in chosen[lo:hi]]

        # rollouts: this rank's rows; row i of the whole batch samples with seed base + i on any rank
        ac.eval()
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                stop_token_ids=stop_ids, seed=cfg.train.seed * 1_000_003 + it + lo,
                                logprobs=False)  # the update recomputes them with the value head
        outputs = engine.generate(batch_prompts, params)
        batch, ended = make_rollout_batch(batch_prompts, outputs, stop_ids, pad_id)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        p, r, mask = batch["prompt_width"], batch["response_width"], batch["response_mask"]

        # scoring
        with torch.no_grad():
            logits, hidden = response_logits(policy, ids, attn, p, r, cfg.temperature)
            old_logp = gather_logprobs(logits, ids[:, p:p + r]) * mask
            ref_logp = gather_logprobs(reference_logits(ids, attn, p, r), ids[:, p:p + r]) * mask
            shell = Trajectory(ids, attn, mask, p, r, old_logp, ref_logp, old_logp, torch.zeros(0), ended)
            values = ac.values(shell, hidden) * mask
            if rm is not None:
                scores = (sequence_scores(rm, ids, attn) - rm_mean) / rm_std
            else:
                scores = torch.tensor(reward_fn([prompt_msgs[i] for i in chosen[lo:hi]], [o.text for o in outputs],
                                                [list(o.token_ids) for o in outputs], **cfg.reward_function_kwargs),
                                      dtype=torch.float32)
            raw_scores = scores.clone()
            scores = penalize_missing_eos(scores, ended, cfg.missing_eos_penalty)
            rewards, _ = kl_penalized_rewards(old_logp, ref_logp, mask, scores, kl_ctl.value, cfg.kl_estimator)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, dist, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask, dist)  # over the whole rollout batch, all ranks
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
                micro = []
                for j in range(0, len(mine), cfg.train.micro_batch_size):
                    ptx_batch = None
                    if ptx:
                        pick = rng.sample(range(len(ptx)), min(cfg.ptx_micro_batch_size, len(ptx)))
                        ptx_batch = collate_rows([[ptx[i]] for i in pick], pad_id)
                    micro.append((traj.select(mine[j:j + cfg.train.micro_batch_size]), ptx_batch))
                res = run.optimizer_step(micro, loss_fn, lambda mb: int(mb[0].response_mask.sum()), step=it)
                if res.grad_norm is not None:
                    grad_norms.append(res.grad_norm)

        rec = iteration_record(it + 1, traj, raw_scores, logits, kl_ctl.value, cfg, dist, mb_stats, ptx)
        rec.update(lr=run.scheduler.get_last_lr()[0], grad_norm=sum(grad_norms) / max(len(grad_norms), 1))
        kl_ctl.update(rec["kl"], B)
        run.after_step(it + 1, rec, state={"kl_coef": kl_ctl.value})
        if (it == 0 or it + 1 == iterations) and run.is_main:
            with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for i in range(min(4, len(outputs))):
                    f.write(json.dumps({"step": it + 1, "prompt": prompt_msgs[chosen[lo + i]],
                                        "response": outputs[i].text, "score": raw_scores[i].item()}) + "\n")

    records = [r for r in read_metrics(run_dir)] if run.is_main else []
    return run.finish(policy, tok, {
        "iterations": iterations,
        "first": {k: records[0].get(k) for k in ("score", "kl", "response_length")} if records else {},
        "last": {k: records[-1].get(k) for k in ("score", "kl", "response_length", "kl_coef")} if records else {}},
        template=renderer.template)
