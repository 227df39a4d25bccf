"""GRPO: reinforcement learning with verifiable rewards and group-relative advantages (Shao et al. 2024, DeepSeekMath),
with DAPO's clip-higher, token-level loss and dynamic sampling (Yu et al. 2025), Dr. GRPO's unbiased aggregation
(Liu et al. 2025) and RLOO's leave-one-out baseline (Ahmadian et al. 2024) as options.

Each iteration (one rollout batch; ``train.max_steps`` of them):
1. prompts: ``prompts_per_step`` prompts drawn by a seeded generator that is a pure function of the iteration (so a
   resumed run draws the same ones); each process takes its share.
2. rollouts: ``num_generations`` (G) sampled responses per prompt (generation/engine.py; the G rows of one prompt
   share its prefill).
3. rewards: the configured components (rl/rewards.py: GSM8K answers, IFEval constraints, format rules, user code),
   summed with weights; each component is logged.
4. advantages: per group of G (rl/advantage.group_advantages), one scalar per response shared by its tokens; with
   ``dynamic_sampling`` groups whose rewards are all equal are dropped (counted in ``groups_dropped``).
5. updates: ``updates_per_batch`` optimizer steps on the batch, each over micro-batches of ``train.micro_batch_size``
   responses, the loss losses.clipped_policy_loss with the aggregation's normaliser counted over the whole step
   (all micro-batches, all processes: exact accumulation). The log-probs of the rollout policy are taken once before
   the first update (with one update they equal the policy's own: the ratio is exactly 1).
No value model and no reward model: the reward is a program. With ``kl_coef`` > 0 the reference is the starting
policy (the LoRA adapter disabled, or a frozen copy).

``train.sharding: fsdp2`` and ``train.gradient_checkpointing`` (training/sharding.py, docs/distributed.md): the policy
is sharded after the frozen reference copy is taken (that copy, without LoRA, stays whole in every process: its
forwards need no collective). Rollouts are generated inside ``sharding.gathered``: every layer is all-gathered once per
iteration and each process samples its own prompts alone. That is the simplest correct design: a sharded forward is a
collective, and lockstep generation would need every process to run as many decode steps as the slowest row of any
process (rows stop at different lengths, and the engine drops finished rows), one all-gather per layer per token. The
price is the full weights in memory while generating (the training passes keep the sharded saving). The reference and
rollout-policy log-probs (one forward per process per iteration) and every update run through the FSDP root
(``sharding.route``); the updates run in lockstep (a process whose groups were all dropped takes an empty micro-batch).
final/ is gathered into the same plain model folder (or adapter) as the unsharded run's.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from instructkit.config import GRPOConfig
from instructkit.data.sources import read_sources
from instructkit.losses import clipped_policy_loss
from instructkit.models.value_head import frozen_reference, reference_logprobs, response_logprobs
from instructkit.rl.advantage import equal_reward_groups, group_advantages
from instructkit.rl.rewards import CombinedReward
from instructkit.rl.rollout import encode_prompts, make_rollout_batch
from instructkit.training import sharding


def main(cfg: GRPOConfig) -> dict[str, Any]:
    from instructkit.chat.render import Renderer
    from instructkit.data.schema import DataError
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.training.run import Run, data_fingerprint

    run = Run.start(cfg, "grpo", shardable=True)
    reward = CombinedReward(cfg.rewards)  # a bad reward spec fails before anything is loaded
    world, rank = run.dist.world_size, run.dist.rank
    if cfg.prompts_per_step % world:
        raise DataError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the {world} processes")

    # -- data (read before the model is loaded), model, reference, prompts
    examples, read_stats = read_sources(cfg.data, cfg.data.sources, run.run_dir)
    policy, tok = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=run.precision)
    renderer = Renderer.from_config(tok, cfg.model.template, cfg.data)
    prompts, dropped = encode_prompts(examples, renderer, cfg.data.max_length, need=cfg.prompts_per_step,
                                      why=f"prompts_per_step={cfg.prompts_per_step}")
    run.check_data(read=read_stats, examples=len(examples), kept=len(prompts), dropped=dropped, unit="prompts")
    run.write_json("data_stats.json", {"read": read_stats, "prompts": len(prompts), "skipped_too_long":
                                       dropped["too_long"], "skipped_no_prompt": dropped["no_prompt"]})
    reference = frozen_reference(policy, cfg.lora.enabled) if cfg.kl_coef > 0 else None  # the starting weights
    policy = run.prepare(policy)  # activation checkpointing, FSDP2 (after the reference copy: it stays whole)
    pad_id, stop_ids = tok.pad_token_id, renderer.stop_token_ids
    engine = Engine(sharding.unwrap(policy), tok, max_batch_size=cfg.prompts_per_step // world * cfg.num_generations)

    def logps(model, b):  # (B, R) response log-probs under the sampling temperature, 0 on padding
        return response_logprobs(model, b["input_ids"], b["attention_mask"], b["prompt_width"], b["response_width"],
                                 cfg.temperature)

    def ref_logps(model, b):  # (B, R) under the reference (a frozen copy, or the policy with its adapter disabled)
        return reference_logprobs(model, reference, b["input_ids"], b["attention_mask"], b["prompt_width"],
                                  b["response_width"], cfg.temperature)

    run.scheduler_steps = (cfg.train.max_steps or 1) * cfg.updates_per_batch
    start = run.setup(policy, total_steps=cfg.train.max_steps or 1,
                      fingerprint=data_fingerprint([p["ids"] for p in prompts]))
    per_rank = cfg.prompts_per_step // world
    step_metrics: dict[int, dict[str, float]] = {}  # by micro-batch: a sharded filler pass repeats one, not counted
    update_metrics: list[dict[str, float]] = []

    @sharding.route  # under fsdp2 the root's hooks wrap the whole loss
    def loss_fn(model, mb):
        lp = logps(model, mb)
        old = mb["old_logps"] if mb["old_logps"] is not None else lp.detach()
        loss, m = clipped_policy_loss(
            lp, old, mb["advantages"], mb["response_mask"], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            ref_logprobs=mb["ref_logps"], kl_coef=cfg.kl_coef, aggregation=cfg.aggregation,
            num_sequences=1, num_tokens=1, max_length=1)  # a sum: optimizer_step divides by the step's count
        if mb["n"]:
            step_metrics[id(mb)] = {k: float(v) * mb["n"] for k, v in m.items()}
        return loss, torch.tensor(count(mb))

    def count(mb) -> int:  # the aggregation's units: responses, tokens, or responses x max_new_tokens
        if cfg.aggregation == "token":
            return int(mb["response_mask"].sum())
        return mb["n"] * (cfg.max_new_tokens if cfg.aggregation == "constant" else 1)

    for it in range(start, run.total_steps):
        # 1-2. prompts and rollouts
        rng = random.Random(f"{cfg.data.seed}:{it}")
        chosen = rng.sample(range(len(prompts)), cfg.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
        rows = [prompts[i] for i in chosen for _ in range(cfg.num_generations)]
        policy.eval()
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                stop_token_ids=stop_ids, seed=cfg.train.seed * 1_000_003 + it * 100_003 + rank * len(rows),
                                logprobs=False)  # row i's seed is seed + i: the rows of any process split sample alike
        t0 = time.perf_counter()
        with sharding.gathered(policy):  # every process; then each generates alone, no collective per token
            outputs = engine.generate([r["ids"] for r in rows], params)
        gen_seconds = time.perf_counter() - t0
        batch, ended = make_rollout_batch([r["ids"] for r in rows], outputs, stop_ids, pad_id)

        # 3. rewards
        scores, parts = reward([r["messages"] for r in rows], [o.text for o in outputs],
                               [list(o.token_ids) for o in outputs], meta=[r["meta"] for r in rows],
                               ended=ended.tolist())
        groups = torch.tensor(scores, dtype=torch.float32).view(per_rank, cfg.num_generations)  # (P, G)

        # 4. advantages, and the groups kept
        adv = group_advantages(groups, cfg.advantage, cfg.scale_by_std).view(-1)  # (P*G,)
        flat = equal_reward_groups(groups)
        keep = ~flat if cfg.dynamic_sampling else torch.ones_like(flat)
        rows_kept = keep.repeat_interleave(cfg.num_generations).nonzero()[:, 0]

        # 5. updates
        mask = batch["response_mask"]
        with torch.no_grad():  # one forward each per process: the same on every process under sharding
            ref = sharding.route(ref_logps)(policy, batch) if cfg.kl_coef > 0 else None
            old = sharding.route(logps)(policy, batch) if cfg.updates_per_batch > 1 else None
        micro = []
        for s in range(0, len(rows_kept), cfg.train.micro_batch_size):
            idx = rows_kept[s:s + cfg.train.micro_batch_size]
            mb = {k: batch[k][idx] for k in ("input_ids", "attention_mask", "response_mask")}
            mb.update(prompt_width=batch["prompt_width"], response_width=batch["response_width"], n=len(idx),
                      advantages=adv[idx], old_logps=None if old is None else old[idx],
                      ref_logps=None if ref is None else ref[idx])
            micro.append(mb)
        if not micro and sharding.is_sharded(policy):  # all groups dropped here: an empty pass keeps the lockstep
            mb = {k: batch[k][:1] for k in ("input_ids", "attention_mask")}
            mb.update(response_mask=torch.zeros_like(batch["response_mask"][:1]), prompt_width=batch["prompt_width"],
                      response_width=batch["response_width"], n=0, advantages=torch.zeros(1), old_logps=None,
                      ref_logps=None if ref is None else ref[:1])
            micro.append(mb)
        update_metrics.clear()
        policy.train()
        losses = []
        for _ in range(cfg.updates_per_batch):
            step_metrics.clear()
            res = run.optimizer_step(micro, loss_fn, count, step=it, token_fn=lambda b: int(b["response_mask"].sum()))
            update_metrics.extend(step_metrics[id(mb)] for mb in micro if id(mb) in step_metrics)
            losses.append(res.loss)

        # metrics: rollout statistics over all processes, then the updates' response-weighted means
        n_rows = len(rows) * world
        keys = ["reward", "response_length", "ended_fraction", *(f"reward_{k}" for k in parts)]
        local = [sum(scores), float(mask.sum()), float(ended.sum()), *(sum(v) for v in parts.values()),
                 float(flat.sum()), float((flat & ~keep).sum()), float(sum(mb["n"] for mb in micro))]
        tot = run.dist.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        rec = run.step_record(it + 1, res)
        rec.update({k: v / n_rows for k, v in zip(keys, tot)})
        rec["groups_flat"], rec["groups_dropped"] = int(tot[-3]), int(tot[-2])
        rec["loss"] = None if any(x is None for x in losses) else sum(losses) / len(losses)
        rec["rollout_tokens_per_s"] = tot[1] / gen_seconds if gen_seconds > 0 else None
        keys_m = ["approx_kl", "clipfrac_high", "clipfrac_low", "ratio"] + (["kl"] if cfg.kl_coef > 0 else [])
        upd = run.dist.sum_metrics(update_metrics, tot[-1] * cfg.updates_per_batch, keys=keys_m)
        rec.update({k: (v if tot[-1] else None) for k, v in upd.items()})  # None: every group dropped, no update
        if it == start or run.due("sample", it + 1):
            run.write_samples(it + 1, [{"prompt": r["messages"][-1]["content"], "response": o.text, "reward": sc}
                                       for r, o, sc in list(zip(rows, outputs, scores))[:cfg.num_generations]])
        run.after_step(it + 1, rec, throughput="rollout_tokens_per_s")

    return run.finish(policy, tok, {"prompts": len(prompts), "num_generations": cfg.num_generations},
                      template=renderer.template)
