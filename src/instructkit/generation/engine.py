"""Batched generation with a KV cache: greedy or sampled, stop tokens and stop strings, streaming.

Why not `model.generate`: it is the reference we test against (greedy outputs are token-identical), but on a 2-core CPU
its per-step Python overhead (logits-processor lists, stopping-criteria objects, mask re-creation) is a large part of
the time for the small models this project trains, finished rows keep computing until the whole batch stops, and it
returns no per-token log-probabilities of the sampled tokens without extra work. The loop here is the same algorithm
kept lean:

- prompts are left-padded into one batch; position ids are ``cumsum(mask) - 1`` exactly as transformers computes them,
  and the 2-D attention mask is handed to the model, which builds its own causal mask (sliding windows included);
- the prompt is run once (prefill) through the model's forward into a transformers ``DynamicCache``; every later step
  feeds one token per row. For Llama-family and Gemma 3 models those steps run through ``fast_decode.FastDecoder``
  (preallocated key/value buffers written in place, fused q/k/v and gate/up matmuls, MKL-packed weights where they
  are bit-identical, no per-step mask building or output objects): the same float operations in the same order, so
  the logits are bit-identical to the forward's and greedy outputs stay token-identical to ``generate``. Sampling
  that returns no log-probabilities (rollouts, Self-Instruct) also packs the weights whose packed product is only
  within fp32 rounding of the plain one: nothing but the sampled tokens leaves the engine there. Other models (and
  ``fast=False``) use the model's forward every step;
- when sampling, rows that repeat a prompt (several responses per prompt, as PPO and GRPO rollouts draw) share one
  prefill: the prompt runs once and its cache is copied to each of its rows (``share_prompts``). Greedy decoding
  keeps the prefill of the batch as given;
- only the last position goes through the output layer (``logits_to_keep=1``), which matters for Gemma's 262k-row
  output layer, and keeps the model's own final-logit soft-capping;
- rows that finish are dropped from the batch (``DynamicCache.batch_select_indices``) once enough of them have finished
  to pay for the copy, so the batch never computes for sequences that are done;
- each row samples from its own ``torch.Generator`` seeded ``seed + row``, so a seeded row gets the same random draws
  whatever else is in the batch and whether or not other rows were dropped (the logits they are applied to can
  differ in the last bits between batch compositions, as batched matmuls do).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    """Upper bound on generated tokens per sequence (finish_reason "length" when reached)."""
    temperature: float = 0.0
    """0 is greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p (1.0 keeps all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 keeps all)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on every token already in the prompt or the output: positive logits are divided by it,
    negative ones multiplied (1.0: off)."""
    stop_token_ids: list[int] | None = None
    """End generation when one of these is produced (kept in token_ids, not in text). None: the tokenizer's eos plus
    the model's generation_config eos ids."""
    stop_strings: Sequence[str] = ()
    """End generation when the decoded output contains one of these; text is cut before it."""
    seed: int | None = None
    """Seed for sampling; row i of a batch uses seed + i. None draws a seed from torch's global generator."""
    logprobs: bool = True
    """Record each generated token's log-probability (a log-softmax over the whole vocabulary per step). Off, greedy
    decoding on the lean decode step finds each argmax without computing every logit (fast_decode.GreedyHead), with
    the same tokens; sampling may then use weight copies whose products are within fp32 rounding of the model's
    (``FastDecoder.prepare``): the same distribution, draws that can differ where a logit's last bit decides."""
    top_logprobs: int = 0
    """Also record the ``top_logprobs`` most likely tokens of each step with their log-probabilities (same raw
    distribution as ``logprobs``; needs ``logprobs``)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class GenerationOutput:
    prompt_ids: list[int]
    token_ids: list[int]
    """Generated ids, including the stop token when one ended the sequence."""
    text: str
    """Decoded output without the stop token, cut before a stop string, special tokens skipped."""
    finish_reason: str
    """"stop" (a stop token or stop string) or "length" (max_new_tokens reached)."""
    logprobs: list[float] = field(default_factory=list)
    """log p(token) of each generated token under the model's raw distribution (temperature 1, before top-k/top-p and
    repetition penalty), one per entry of token_ids; empty when SamplingParams.logprobs is False."""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per generated token, the SamplingParams.top_logprobs most likely (token id, log-probability) pairs of that step,
    most likely first; empty when not asked for."""


@dataclass
class Row:
    """One sequence being generated: its prompt, its own sampling parameters and seed, and what it produced so far.

    ``Engine.run(rows)`` fills rows in place; rows in one batch may have different parameters (the server batches
    concurrent requests this way). Set ``cancelled`` from another thread to end a row at the next step."""
    index: int  # position in the caller's prompt list
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # the row's own sampling generator is seeded with this
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_cut: int | None = None  # char offset of a matched stop string in the decoded text
    cancelled: bool = False
    stop_ids: frozenset = frozenset()  # resolved by Engine.run



def _as_int_list(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]


class Engine:
    """Generate from a causal LM (transformers or peft-wrapped) with a tokenizer.

    ``Engine(model, tokenizer).generate([prompt_ids, ...], SamplingParams(...))``. ``max_batch_size`` bounds the rows
    processed together; larger requests are split into length-sorted batches (outputs keep the request order).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, template: str = "auto", fast: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.template = template
        self.prune_finished = True  # drop finished rows from the batch (see the module docstring)
        self.share_prompts = True  # sampling: rows with the same prompt share one prefill (see the module docstring)
        # the lean decode step of fast_decode.py for the models it supports (others, and fast=False, use the forward)
        self.fast = fast
        self._renderer = None
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    # ----------------------------------------------------------------------------------------------------------------
    # stop tokens and chat prompts
    @property
    def default_stop_token_ids(self) -> list[int]:
        ids = _as_int_list(self.tokenizer.eos_token_id)
        gen_cfg = getattr(self.model, "generation_config", None)
        if gen_cfg is not None:
            ids += _as_int_list(gen_cfg.eos_token_id)
        return sorted(set(ids))

    @property
    def renderer(self):
        """chat/render.py's Renderer when it is available (it owns the chat template), else None."""
        if self._renderer is None:
            try:
                from instructkit.chat.render import Renderer
            except ImportError:
                return None
            self._renderer = Renderer(self.tokenizer, template=self.template)
        return self._renderer

    def chat_prompt_ids(self, messages: Sequence[Any], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation up to and including the assistant generation prompt. ``tools``: function
        definitions (OpenAI shape) the template renders into the prompt; a template that never reads ``tools`` is a
        ValueError (they would be dropped without a word)."""
        msgs = [_message_dict(m) for m in messages]
        if tools:
            source = self.chat_template_source or ""
            if "tools" not in source:
                raise ValueError("the model's chat template does not render tools: they would be dropped")
        renderer = self.renderer
        rich = bool(tools) or any(len(m) > 2 for m in msgs)  # tool calls, tool results, reasoning
        if renderer is not None:
            import inspect

            takes_tools = "tools" in inspect.signature(renderer.render_prompt).parameters
            if not rich or takes_tools:
                return list(renderer.render_prompt(msgs, tools=tools) if tools else renderer.render_prompt(msgs))
            if self.template != "auto":
                raise ValueError(f"template {self.template!r}: this renderer cannot render tool calls, tool results "
                                 "or reasoning")
            # a renderer that passes only role and content: the tokenizer's own template, as transformers renders it
        kwargs = {"tools": tools} if tools else {}
        out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kwargs)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]

    @property
    def chat_template_source(self) -> str | None:
        """The Jinja source of the chat template prompts are rendered with."""
        renderer = self.renderer
        src = getattr(getattr(renderer, "chat_template", None), "source", None) if renderer is not None else None
        if src is None:
            src = getattr(renderer, "template", None) if renderer is not None else None
        if not isinstance(src, str):
            src = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else None
        return src

    def chat_stop_token_ids(self) -> list[int]:
        ids = set(self.default_stop_token_ids)
        renderer = self.renderer
        if renderer is not None:
            ids.update(int(t) for t in renderer.stop_token_ids)
        return sorted(ids)

    def chat(self, conversations: Sequence[Sequence[Any]], params: SamplingParams | None = None) -> list[GenerationOutput]:
        """Generate the next assistant turn for each message list (dicts with role/content, or schema Messages)."""
        params = params or SamplingParams()
        if params.stop_token_ids is None:
            params = _replace(params, stop_token_ids=self.chat_stop_token_ids())
        return self.generate([self.chat_prompt_ids(c) for c in conversations], params)

    # ----------------------------------------------------------------------------------------------------------------
    # public generation API
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[GenerationOutput]:
        params = params or SamplingParams()
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        base_seed = self._base_seed(params)
        results: list[GenerationOutput | None] = [None] * len(prompts)
        order = list(range(len(prompts)))
        if len(prompts) > self.max_batch_size:  # similar lengths together: less padding
            order.sort(key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            rows = [Row(index=i, prompt=prompts[i], params=params, seed=base_seed + i) for i in chunk]
            for _ in self.run(rows):
                pass
            for row in rows:
                results[row.index] = self.output(row)
        return results  # type: ignore[return-value]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated; their concatenation equals ``generate(...)[0].text``.

        Text that could still turn into a stop string, or an incomplete UTF-8 character, is held back until it is
        settled.
        """
        params = params or SamplingParams()
        row = Row(index=0, prompt=list(map(int, prompt_ids)), params=params, seed=self._base_seed(params))
        if not row.prompt:
            raise ValueError("prompt is empty")
        emitted = 0
        for _ in self.run([row]):
            text = self.settled_text(row)
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        text = self.text(row)
        if len(text) > emitted:
            yield text[emitted:]
        self.last_stream_output = self.output(row)

    def settled_text(self, row: Row) -> str:
        """The part of ``row``'s text that can no longer change (all of it once the row is finished)."""
        text = self.text(row)
        if row.finish_reason is not None:
            return text
        return text[:_settled_length(text, row.params.stop_strings)]

    @torch.inference_mode()
    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], top_k: int = 0, batch_size: int = 8
                        ) -> list[tuple[list[float | None], list[list[tuple[int, float]] | None]]]:
        """Per prompt, log p(token_i | tokens before it) for every token (None for the first, which has no context)
        and, with ``top_k``, the k most likely (id, log-probability) pairs at each position (None for the first): what
        an OpenAI completions request with ``echo`` returns, and what lm-eval's loglikelihood requests read.

        One forward per batch of right-padded prompts; the output layer runs 256 positions at a time, so a long prompt
        never holds a (T, vocabulary) matrix of Gemma's 262k columns at once."""
        from instructkit.models.load import causal_lm_parts

        body, head, softcap = causal_lm_parts(self.model)
        device = next(self.model.parameters()).device
        out: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            T = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), T), self.pad_id, dtype=torch.long)  # (B, T) right-padded
            attn = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(prompts[i])] = torch.tensor(list(prompts[i]), dtype=torch.long)
                attn[r, :len(prompts[i])] = 1
            hidden = body(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).last_hidden_state
            for r, i in enumerate(idx):
                p = list(prompts[i])
                lps: list[float | None] = [None]
                tops: list = [None]
                for c in range(0, len(p) - 1, 256):  # position t predicts token t + 1
                    h = hidden[r, c:min(c + 256, len(p) - 1)]  # (C, H)
                    logits = head(h).float()  # (C, V)
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    logp = torch.log_softmax(logits, dim=-1)  # (C, V)
                    target = torch.tensor(p[c + 1:c + 1 + h.shape[0]], device=logp.device)
                    lps += logp.gather(1, target[:, None])[:, 0].tolist()
                    if top_k:
                        v, k = torch.topk(logp, top_k, dim=-1)
                        tops += [list(zip(kk, vv)) for kk, vv in zip(k.tolist(), v.tolist())]
                    else:
                        tops += [None] * h.shape[0]
                out[i] = (lps, tops)
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # internals
    @staticmethod
    def _base_seed(params: SamplingParams) -> int:
        if params.seed is not None:
            return int(params.seed)
        return int(torch.randint(0, 2**31 - 1, (1,)).item())

    def text(self, row: Row) -> str:
        toks = row.tokens
        if row.finish_reason == "stop" and row.stop_cut is None and toks:
            toks = toks[:-1]  # the stop token itself is not text
        text = self.tokenizer.decode(toks, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if row.stop_cut is not None:
            text = text[:row.stop_cut]
        return text

    def output(self, row: Row) -> GenerationOutput:
        return GenerationOutput(
            prompt_ids=row.prompt,
            token_ids=list(row.tokens),
            text=self.text(row),
            finish_reason=row.finish_reason or "length",
            logprobs=list(row.logprobs),
            top_logprobs=list(row.top_logprobs),
        )

    def _check_stop_string(self, row: Row) -> None:
        stops = row.params.stop_strings
        # a stop string of n characters spans at most n tokens, plus a few for partial UTF-8 bytes
        window = 4 * max(len(s) for s in stops) + 4
        tail = self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not any(s in tail for s in stops):
            return
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            row.stop_cut = min(cuts)
            row.finish_reason = "stop"

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> Iterator[None]:
        """Generate into ``rows`` in place, each with its own SamplingParams and seed; yields once after every step.

        Rows may differ in every sampling parameter: the longest ``max_new_tokens`` sets the cache size, a row ends at
        its own limit, stop tokens and stop strings; sampling groups the rows with the same temperature, top-k and
        top-p. A row whose ``cancelled`` is set (by another thread) ends at the next step with finish_reason
        "cancelled". With one parameter set for all rows this is exactly the loop ``generate`` runs."""
        model = self.model
        device = next(model.parameters()).device
        for r in rows:
            p = r.params
            r.stop_ids = frozenset(self.default_stop_token_ids if p.stop_token_ids is None else p.stop_token_ids)
            if p.max_new_tokens == 0:
                r.finish_reason = "length"
        live = [r for r in rows if r.finish_reason is None]
        if not live:
            return
        rows = live
        params = [r.params for r in rows]
        max_new = max(p.max_new_tokens for p in params)
        want_logprobs = any(p.logprobs for p in params)
        top_n = max(p.top_logprobs for p in params)
        penalty = None
        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)[:, None]
        all_sample = all(p.temperature > 0 for p in params)

        B = len(rows)
        max_len = max(len(r.prompt) for r in rows)
        input_ids = torch.full((B, max_len), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, max_len), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token is in the last column
            input_ids[i, max_len - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            attn[i, max_len - len(r.prompt):] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        position_ids = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)  # as transformers' generate computes them
        padded = bool((attn == 0).any())

        generators: list = []
        for r in rows:
            g = None
            if r.params.temperature > 0:
                g = torch.Generator(device=device)
                g.manual_seed(r.seed)
            generators.append(g)
        seen = None  # (B, V) bool: tokens already in prompt or output, for the repetition penalty

        from transformers import DynamicCache

        from instructkit.models.load import repeated_rows

        active = list(range(B))  # indices into rows of the sequences still in the batch
        # PPO and GRPO rollouts sample several responses per prompt; the prompt is the long part, so its prefill runs
        # once (SmolLM2 with a LoRA adapter, 8 rows of ~100 prompt tokens, 4 per prompt: 850 -> 230 ms)
        share = repeated_rows([tuple(r.prompt) for r in rows], device) if all_sample and self.share_prompts else None
        first = slice(None) if share is None else share[0]
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids[first], attention_mask=attn[first] if padded else None,
                    position_ids=position_ids[first], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        del out
        fast = None
        chosen = None  # the next tokens when the greedy step picked them without returning logits
        if self.fast and max_new > 1:
            from instructkit.generation.fast_decode import FastDecoder

            fast = FastDecoder.build(model)
        if share is not None:
            logits = logits.index_select(0, share[1])
            if fast is None:
                cache.batch_select_indices(share[1])
        if fast is not None:  # the prefill's cache moves into preallocated buffers written in place
            # bit-identical logits where they can be seen: greedy tokens, log-probs (see FastDecoder.prepare)
            cache = fast.start(cache, B, max_len, max_len + max_new,
                               exact=any(p.temperature == 0 or p.logprobs for p in params),
                               rows=None if share is None else share[1])
        # greedy without log-probs or penalty needs only each step's argmax: the lean step finds it without every logit
        greedy_ids = (fast is not None and penalty is None and not want_logprobs
                      and all(p.temperature == 0 for p in params))
        last_pos = position_ids[:, -1:]
        for step in range(max_new):
            if chosen is not None:
                next_tokens = chosen
            else:
                logits = logits.float()  # (b, V)
                V = logits.shape[-1]
                if penalty is not None:
                    if seen is None:
                        seen = torch.zeros((B, V), dtype=torch.bool, device=device)
                        for i, r in enumerate(rows):
                            seen[i, torch.tensor([t for t in r.prompt if t < V], dtype=torch.long)] = True
                    scores = _apply_repetition_penalty(logits, seen[active], penalty[active])
                else:
                    scores = logits
                next_tokens = self._choose_rows(scores, [params[i] for i in active], [generators[i] for i in active])
            next_list = next_tokens.tolist()
            logp_list = top_list = None
            if want_logprobs:
                lsm = torch.log_softmax(logits, dim=-1)  # (b, V)
                logp_list = lsm.gather(1, next_tokens[:, None])[:, 0].tolist()
                if top_n:
                    v, k = torch.topk(lsm, top_n, dim=-1)
                    top_list = [list(zip(kk, vv)) for kk, vv in zip(k.tolist(), v.tolist())]
            for j, i in enumerate(active):
                r = rows[i]
                if r.finish_reason is not None:  # finished, still in the batch until enough rows are done to prune
                    continue
                if r.cancelled:
                    r.finish_reason = "cancelled"
                    continue
                t = next_list[j]
                r.tokens.append(t)
                if logp_list is not None and r.params.logprobs:
                    r.logprobs.append(logp_list[j])
                    if r.params.top_logprobs:
                        r.top_logprobs.append(top_list[j][:r.params.top_logprobs])
                if seen is not None:
                    seen[i, t] = True
                if t in r.stop_ids:
                    r.finish_reason = "stop"
                elif r.params.stop_strings:
                    self._check_stop_string(r)
                if r.finish_reason is None and len(r.tokens) >= r.params.max_new_tokens:
                    r.finish_reason = "length"
            yield
            keep = [j for j, i in enumerate(active) if rows[i].finish_reason is None and not rows[i].cancelled]
            for j, i in enumerate(active):
                if rows[i].finish_reason is None and rows[i].cancelled:
                    rows[i].finish_reason = "cancelled"
            if not keep:
                break
            if self.prune_finished and len(keep) < len(active) and (len(active) - len(keep)) * 4 >= len(active):
                # drop finished rows once a quarter of the batch is done: the cache copy costs about one step
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                if fast is not None:
                    cache.select(idx)
                else:
                    cache.batch_select_indices(idx)
                attn = attn[idx]
                last_pos = last_pos[idx]
                next_tokens = next_tokens[idx]
                active = [active[j] for j in keep]
            if padded:
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            last_pos = last_pos + 1
            if greedy_ids:
                chosen = fast.greedy_step(cache, next_tokens, last_pos, attn if padded else None)
            elif fast is not None:
                logits = fast.step(cache, next_tokens, last_pos, attn if padded else None)
            else:
                out = model(input_ids=next_tokens[:, None], attention_mask=attn if padded else None,
                            position_ids=last_pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                logits = out.logits[:, -1, :]

    @classmethod
    def _choose_rows(cls, scores: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
        """(b, V) scores -> (b,) ids, each row by its own parameters: rows sharing (temperature, top-k, top-p) are
        chosen together (one group when a batch shares its parameters, as ``generate`` and rollouts do)."""
        keys = [(p.temperature, p.top_k, p.top_p) for p in params]
        if len(set(keys)) == 1:
            return cls._choose(scores, params[0], generators if params[0].temperature > 0 else None)
        out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for key in set(keys):
            idx = [j for j, k in enumerate(keys) if k == key]
            p = params[idx[0]]
            t = torch.tensor(idx, dtype=torch.long, device=scores.device)
            out[t] = cls._choose(scores[t], p, [generators[j] for j in idx] if p.temperature > 0 else None)
        return out

    @staticmethod
    def _choose(scores: torch.Tensor, params: SamplingParams, generators: list | None) -> torch.Tensor:
        """(b, V) scores -> (b,) token ids: argmax, or a sample after temperature, top-k and top-p."""
        if params.temperature == 0 or generators is None:
            return scores.argmax(dim=-1)
        scores = scores / params.temperature
        if params.top_k and params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=True)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p; the most likely token always stays
            drop_sorted = (cum - sorted_scores.softmax(dim=-1)) >= params.top_p
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(1, sorted_idx, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return _sample_rows(scores.softmax(dim=-1), generators)


def _sample_rows(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """One token per row of (b, V) probabilities, row j driven by its own generator only (so a row's samples do not
    depend on the batch it is in), by inverse transform sampling: one uniform u per row, the first token whose
    cumulative probability exceeds u times the total. Written here instead of ``torch.multinomial`` because that draws
    V exponential variates per call (one per vocabulary entry: 7 ms per step for 8 rows of SmolLM2's 49,152 tokens
    on this CPU, more than a small model's forward) where one uniform per row suffices. The cumulative sum is in fp64
    so that rounding cannot move probability mass between distant tokens; a zero-probability token (masked by top-k
    or top-p) is never chosen: its cumulative value equals its predecessor's."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators])
    cdf = probs.double().cumsum(dim=-1)  # (b, V)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):  # as torch.multinomial refuses them
        raise ValueError("probability tensor contains inf, nan or only zeros (non-finite logits?)")
    idx = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0]  # first index with cdf > u * total
    return idx.clamp_max(probs.shape[-1] - 1)


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """``penalty``: a float, or a (b, 1) tensor of per-row penalties (1.0 leaves a row's logits exactly as they are)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _settled_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of ``text`` that can no longer change: no trailing replacement character (an incomplete
    UTF-8 sequence) and no suffix that is the beginning of a stop string."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k:n] == s[:k]:
                hold = max(hold, k)
                break
    return n - hold


_MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "reasoning")


def _message_dict(m: Any) -> dict[str, Any]:
    """role and content, plus the tool-call and reasoning keys a message carries (as apply_chat_template passes them)."""
    get = m.get if isinstance(m, dict) else (lambda k, d=None: getattr(m, k, d))
    out: dict[str, Any] = {"role": get("role"), "content": get("content")}
    for k in _MESSAGE_EXTRAS:
        v = get(k)
        if v not in (None, (), []):
            out[k] = [c if isinstance(c, dict) else {"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in v] if k == "tool_calls" else v
    return out


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)
