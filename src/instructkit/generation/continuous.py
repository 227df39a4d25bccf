"""Continuous batching: rows join a running decode batch at step boundaries and leave it when they finish.

``Engine.run`` decodes a fixed set of rows from one prefill to the last row's end. A server fed by many clients then
decodes in waves: a request that arrives while a batch runs waits for the whole batch, and the batch keeps stepping
for its last straggler while the clients whose rows finished wait for their next request to be admitted. Here the
batch stays open instead (what vLLM and TGI call continuous batching):

- ``add(rows)``: each distinct prompt among the new rows is prefilled on its own (batch of one, no padding: the same
  forward, hence the same cache and first token, as the row served alone; rows repeating a prompt, a request's ``n``
  choices, share it), the first token is chosen from the prefill's logits, and the row's cache is written into the
  running batch's key/value buffers (``fast_decode.DecodeState``), right-aligned with the other rows: every row's
  newest token sits in the same column, the columns before a row's prompt are masked as padding (exactly how
  ``Engine.run`` left-pads prompts of different lengths). A prompt longer than the filled columns shifts the batch
  right; buffers grow when a row needs more room than is left. A row takes the slot of a finished row when there is
  one (the batch keeps its size, so the weights packed for that size stay in use), else the batch grows by one.
- ``step()``: one decode step (``FastDecoder.greedy_step`` when every live row is greedy without log-probabilities or
  penalty, else ``FastDecoder.step`` and each row's own sampling, as ``Engine.run`` chooses); finished and cancelled
  rows stop being recorded at once and are dropped from the buffers once a quarter of the batch is done; leading
  columns that no row uses any more are dropped with them, so the buffers do not grow while the batch never empties.

Each row is recorded exactly as ``Engine.run`` records it (stop tokens, stop strings, max_new_tokens, log-probs,
cancellation), with its own sampling generator seeded ``row.seed``. A greedy row computes the same float operations as
it does alone in ``Engine.run``, up to the last bits that a batched matmul and a padding mask may round differently
(the same caveat as batching in ``Engine.run``; tests/test_continuous.py checks token equality).

Only models the lean decode step supports (``fast_decode.unsupported_reason``) batch continuously; ``supported``
says whether this engine's model does (the server falls back to whole-batch ``Engine.run`` otherwise).
"""

from __future__ import annotations

import torch

from instructkit.generation.engine import Engine, Row, _apply_repetition_penalty

_SLACK = 64  # extra buffer columns allocated when the buffers grow, so that growth is rare


class ContinuousBatch:
    """A decode batch that rows join and leave between steps (module docstring). Not thread-safe: one thread owns it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.device = next(engine.model.parameters()).device
        self.fast = None
        self.slots: list[Row | None] = []  # the row decoded in each batch slot (None or finished: a dead slot)
        self.state = None  # fast_decode.DecodeState of the slots
        self.attn: torch.Tensor | None = None  # (b, length) 1 where a slot's column holds one of its tokens
        self.last_pos: torch.Tensor | None = None  # (b, 1) position id of each slot's newest token
        self.next_tokens: torch.Tensor | None = None  # (b,) each slot's newest token (the next step's input)
        self.generators: list = []
        self.seen: list = []  # per slot: (V,) bool tokens already in prompt or output, for the repetition penalty
        self.padded = False
        self.prefills = 0  # counters (tests, logs): prefill forwards, decode steps, most live rows in one step
        self.steps = 0
        self.max_rows = 0
        self._stable = 0  # steps since the batch size last changed (packing the weights waits for a stable size)

    @staticmethod
    def supported(engine: Engine) -> bool:
        from instructkit.generation.fast_decode import unsupported_reason

        return bool(engine.fast) and unsupported_reason(engine.model) is None

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def live(self) -> list[Row]:
        return [r for r in self.slots if r is not None and r.finish_reason is None]

    def __len__(self) -> int:
        return len(self.live)

    @torch.inference_mode()
    def add(self, rows: list[Row]) -> None:
        """Prefill ``rows``, record each one's first token, and put the rows that go on into the batch."""
        from transformers import DynamicCache

        from instructkit.generation.fast_decode import FastDecoder

        eng = self.engine
        for r in rows:
            p = r.params
            r.stop_ids = frozenset(eng.default_stop_token_ids if p.stop_token_ids is None else p.stop_token_ids)
            if not r.prompt:
                raise ValueError("prompt is empty")
            if r.cancelled:
                r.finish_reason = "cancelled"
            elif p.max_new_tokens == 0:
                r.finish_reason = "length"
        rows = [r for r in rows if r.finish_reason is None]
        if not rows:
            return
        if not any(s is not None and s.finish_reason is None for s in self.slots):
            self._reset()
            self.fast = None
        if self.fast is None:  # a new batch: the decoder, its fused weights refreshed if the model's changed
            self.fast = FastDecoder.build(eng.model)
            if self.fast is None:
                raise RuntimeError("continuous batching needs a model the lean decode step supports")
        groups: dict[tuple, list[Row]] = {}
        for r in rows:
            groups.setdefault(tuple(r.prompt), []).append(r)
        for prompt, group in groups.items():
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
            cache = DynamicCache(config=eng.model.config)
            out = eng.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            self.prefills += 1
            logits = out.logits[:, -1, :].float().expand(len(group), -1)  # (k, V): one prompt, k rows
            gens = []
            for r in group:
                g = None
                if r.params.temperature > 0:
                    g = torch.Generator(device=self.device)
                    g.manual_seed(r.seed)
                gens.append(g)
            seen = [self._seen_of(r, logits.shape[-1]) for r in group]
            first = self._choose_and_record(group, logits, gens, seen)
            going = [j for j, r in enumerate(group) if r.finish_reason is None]
            if going:
                self._insert([group[j] for j in going], out.past_key_values, len(prompt),
                             [first[j] for j in going], [gens[j] for j in going], [seen[j] for j in going])
            del out

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every live row (nothing when none is live)."""
        if not self.live:
            return
        self._prune()
        live = [i for i, r in enumerate(self.slots) if r is not None and r.finish_reason is None]
        self.max_rows = max(self.max_rows, len(live))
        b = len(self.slots)
        self._stable += 1
        if self._stable == 8 and b >= 2:  # enough steps at this size to pay for packing the weights for it
            self.fast.prepare(b, exact=True)
        self.attn = torch.cat([self.attn, self.attn.new_ones((b, 1))], dim=1)
        self.last_pos = self.last_pos + 1
        attn = self.attn if self.padded else None
        rows = [self.slots[i] for i in live]
        params = [r.params for r in rows]
        self.steps += 1
        if all(p.temperature == 0 and not p.logprobs and p.repetition_penalty == 1.0 for p in params):
            tokens = self.fast.greedy_step(self.state, self.next_tokens, self.last_pos, attn)
            self.next_tokens = tokens
            chosen = tokens.tolist()
            for i in live:
                self._record(self.slots[i], chosen[i], None, None)
                if self.seen[i] is not None:
                    self.seen[i][chosen[i]] = True
            return
        logits = self.fast.step(self.state, self.next_tokens, self.last_pos, attn).float()  # (b, V)
        idx = torch.tensor(live, dtype=torch.long, device=self.device)
        picked = self._choose_and_record(rows, logits.index_select(0, idx), [self.generators[i] for i in live],
                                         [self.seen[i] for i in live])
        nxt = self.next_tokens.clone()
        nxt[idx] = torch.tensor(picked, dtype=torch.long, device=self.device)
        self.next_tokens = nxt

    # ----------------------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every row and free the buffers (the server calls it when it goes idle or a step failed)."""
        self._reset()

    def _reset(self) -> None:
        self.slots, self.generators, self.seen = [], [], []
        self.state = self.attn = self.last_pos = self.next_tokens = None
        self.padded = False
        self._stable = 0

    def _seen_of(self, r: Row, vocab: int):
        if r.params.repetition_penalty == 1.0:
            return None
        seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        seen[torch.tensor([t for t in r.prompt if t < vocab], dtype=torch.long)] = True
        return seen

    def _choose_and_record(self, rows: list[Row], logits: torch.Tensor, gens: list, seen: list) -> list[int]:
        """Choose each row's next token from its (k, V) logits, as ``Engine.run`` does, and record it."""
        params = [r.params for r in rows]
        scores = logits
        if any(s is not None for s in seen):
            pen = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=self.device)[:, None]
            mask = torch.stack([s if s is not None else torch.zeros(logits.shape[-1], dtype=torch.bool,
                                                                     device=self.device) for s in seen])
            scores = _apply_repetition_penalty(logits, mask, pen)
        chosen = Engine._choose_rows(scores, params, gens).tolist()
        lps = tops = None
        if any(p.logprobs for p in params):
            lsm = torch.log_softmax(logits, dim=-1)
            lps = lsm.gather(1, torch.tensor(chosen, device=self.device)[:, None])[:, 0].tolist()
            top_n = max(p.top_logprobs for p in params)
            if top_n:
                v, k = torch.topk(lsm, top_n, dim=-1)
                tops = [list(zip(kk, vv)) for kk, vv in zip(k.tolist(), v.tolist())]
        for j, r in enumerate(rows):
            self._record(r, chosen[j], None if lps is None else lps[j], None if tops is None else tops[j])
            if seen[j] is not None:
                seen[j][chosen[j]] = True
        return chosen

    def _record(self, r: Row, t: int, lp, top) -> None:
        if r.cancelled:
            r.finish_reason = "cancelled"
            return
        r.tokens.append(t)
        if lp is not None and r.params.logprobs:
            r.logprobs.append(lp)
            if r.params.top_logprobs:
                r.top_logprobs.append(top[:r.params.top_logprobs])
        if t in r.stop_ids:
            r.finish_reason = "stop"
        elif r.params.stop_strings:
            self.engine._check_stop_string(r)
        if r.finish_reason is None and len(r.tokens) >= r.params.max_new_tokens:
            r.finish_reason = "length"

    def _room(self) -> int:
        """Columns the live rows still need after the filled ones: each row writes one per step to its last token."""
        return max((r.params.max_new_tokens - len(r.tokens) for r in self.live), default=0)

    def _insert(self, rows: list[Row], cache, plen: int, first: list[int], gens: list, seen: list) -> None:
        """Write the prefill ``cache`` (one row, ``plen`` columns) of ``rows`` into free or new slots."""
        fast = self.fast
        need = max(r.params.max_new_tokens - len(r.tokens) for r in rows)
        if self.state is None:
            cap = plen + need + _SLACK
            self.state = fast.start(cache, len(rows), plen, cap, exact=True,
                                    rows=torch.zeros(len(rows), dtype=torch.long, device=self.device))
            self.slots = list(rows)
            self.generators, self.seen = list(gens), list(seen)
            self.attn = torch.ones((len(rows), plen), dtype=torch.long, device=self.device)
            self.last_pos = torch.full((len(rows), 1), plen - 1, dtype=torch.long, device=self.device)
            self.next_tokens = torch.tensor(first, dtype=torch.long, device=self.device)
            self._stable = 0
            return
        st = self.state
        length = st.length
        shift = max(0, plen - length)  # a longer prompt than the filled columns: every row moves right
        cap = st.keys[0].shape[2]
        room = max(self._room(), need)
        if shift or length + room > cap:
            self._rebuild(length + shift + room + _SLACK, shift)
            length = self.state.length
            st = self.state
        free = [i for i, r in enumerate(self.slots) if r is None or r.finish_reason is not None]
        new = len(rows) - min(len(free), len(rows))
        if new:  # grow the batch by the slots still missing
            b = len(self.slots)
            st.keys = [torch.cat([k, k.new_zeros((new, *k.shape[1:]))]) for k in st.keys]
            st.values = [torch.cat([v, v.new_zeros((new, *v.shape[1:]))]) for v in st.values]
            self.attn = torch.cat([self.attn, self.attn.new_zeros((new, self.attn.shape[1]))])
            self.last_pos = torch.cat([self.last_pos, self.last_pos.new_zeros((new, 1))])
            self.next_tokens = torch.cat([self.next_tokens, self.next_tokens.new_zeros(new)])
            self.slots += [None] * new
            self.generators += [None] * new
            self.seen += [None] * new
            free += list(range(b, b + new))
            self._stable = 0
        layers = cache.layers[: len(fast.layers)]
        for j, r in enumerate(rows):
            i = free[j]
            for layer, k_buf, v_buf in zip(layers, st.keys, st.values):
                n = layer.keys.shape[2]  # a sliding-window layer may hold only its last window - 1 columns
                k_buf[i].zero_()
                v_buf[i].zero_()
                k_buf[i, :, length - n:length] = layer.keys[0]
                v_buf[i, :, length - n:length] = layer.values[0]
            self.attn[i].zero_()
            self.attn[i, length - plen:] = 1
            self.last_pos[i, 0] = plen - 1
            self.next_tokens[i] = first[j]
            self.slots[i], self.generators[i], self.seen[i] = r, gens[j], seen[j]
        self.padded = not bool(self.attn.all())

    def _rebuild(self, cap: int, shift: int) -> None:
        """New buffers of ``cap`` columns holding the filled ones moved ``shift`` columns right."""
        st = self.state
        length = st.length
        b = len(self.slots)

        def moved(buf):
            out = buf.new_zeros((b, buf.shape[1], cap, buf.shape[3]))
            out[:, :, shift:shift + length] = buf[:, :, :length]
            return out

        st.keys = [moved(k) for k in st.keys]
        st.values = [moved(v) for v in st.values]
        st.length = length + shift
        if shift:
            self.attn = torch.cat([self.attn.new_zeros((b, shift)), self.attn], dim=1)

    def _prune(self) -> None:
        """Drop dead slots once a quarter of the batch is dead, and the leading columns no live row uses."""
        b = len(self.slots)
        keep = [i for i, r in enumerate(self.slots) if r is not None and r.finish_reason is None]
        if len(keep) == b or (b - len(keep)) * 4 < b:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        st = self.state
        attn = self.attn.index_select(0, idx)
        used = attn.any(dim=0).nonzero()
        lead = int(used[0, 0]) if used.numel() else 0
        length = st.length
        st.keys = [k.index_select(0, idx) for k in st.keys]
        st.values = [v.index_select(0, idx) for v in st.values]
        if lead * 4 >= length:  # a quarter of the columns unused by every live row: move them out
            st.keys = [torch.cat([k[:, :, lead:], k[:, :, :lead]], dim=2) for k in st.keys]
            st.values = [torch.cat([v[:, :, lead:], v[:, :, :lead]], dim=2) for v in st.values]
            st.length = length - lead
            attn = attn[:, lead:]
        self.attn = attn
        self.last_pos = self.last_pos.index_select(0, idx)
        self.next_tokens = self.next_tokens.index_select(0, idx)
        self.slots = [self.slots[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.seen = [self.seen[i] for i in keep]
        self.padded = not bool(self.attn.all())
        self._stable = 0
