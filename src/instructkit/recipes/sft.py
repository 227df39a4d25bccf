"""Supervised fine-tuning (SFT), read top to bottom: config, data, render, model, loop, checkpoint, final save, summary.

`instructkit sft --config configs/tiny_sft.yaml [key.sub=value ...]`. The mechanics (exact gradient accumulation,
schedule, clipping, non-finite guard, data parallelism) are training/loop.py's; atomic checkpoints and exact resume are
training/checkpoint.py's; the loss (output layer only at supervised positions) is losses.sft_loss_fused.

Outputs in ``<train.output_dir>/<train.run_name>/``: config.yaml (resolved), data_stats.json, metrics.jsonl,
samples.jsonl, checkpoints/ (step-N + latest), final/ (a plain transformers model folder, or a peft adapter folder for
LoRA/QLoRA, with the tokenizer and the chat template used in training) and summary.json.

``model.path: "tiny:"`` builds a tiny random Llama with a ChatML tokenizer (models/tiny.py) into ``<run>/tiny_model``
and trains that: smoke runs and tests without any model files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from instructkit.config import ConfigError, SFTConfig
from instructkit.data.sources import held_out_indices
from instructkit.training.packing import IGNORE_INDEX, Sample, build_rows, collate_rows, prepare_samples

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------
def _read_source(src, cfg: SFTConfig, run_dir: Path, stats: dict | None = None) -> list:
    """The conversations of one data source; what the read saw goes to ``stats[src.path]``."""
    from instructkit.data.io import ReadStats

    st = ReadStats()
    out = _read(src, cfg, run_dir, st)
    if stats is not None:
        stats[src.path] = st.to_dict() if st.total else {"total": len(out), "kept": len(out), "rejected": 0}
    return out


def _read(src, cfg: SFTConfig, run_dir: Path, st) -> list:
    if src.path.startswith("builtin:"):
        try:
            from instructkit.data.builtin import load_builtin
        except ImportError:
            raise ConfigError(f"data path {src.path!r}: built-in data sets are not available in this build") from None
        examples = list(load_builtin(src.path.split(":", 1)[1]))
        # counted as a file read counts: the examples up to the slice's end, the skipped ones among them
        end = len(examples) if not src.max_examples else min(len(examples), src.skip + src.max_examples)
        st.total = st.kept = st.examples = end
        st.skipped = min(src.skip, end)
        examples = examples[src.skip:]
        return examples[: src.max_examples] if src.max_examples else examples
    from instructkit.data.io import read_conversations

    return read_conversations(src.path, src.format, skip_invalid=cfg.data.skip_invalid,
                              rejects_path=cfg.data.rejects_path or (run_dir / "rejects.jsonl"),
                              max_invalid_fraction=cfg.data.max_invalid_fraction, max_examples=src.max_examples,
                              skip=src.skip,
                              tool_call_format=cfg.data.tool_call_format, split_think=cfg.data.split_think,
                              stats=st)


def load_conversations(cfg: SFTConfig, run_dir: Path, stats: dict | None = None) -> tuple[list, list]:
    """(train, validation) conversations. Without validation sources, a seeded ``validation_fraction`` is held out.
    ``stats``: read stats by training source."""
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: give at least one training data source")
    train = [c for src in cfg.data.sources for c in _read_source(src, cfg, run_dir, stats)]
    val = [c for src in cfg.data.validation for c in _read_source(src, cfg, run_dir)]
    if not cfg.data.validation and cfg.data.validation_fraction > 0 and len(train) > 1:
        held = held_out_indices(train, cfg.data.validation_fraction, cfg.data.seed, cfg.data.validation_split_by,
                                at_least=1)
        val = [train[i] for i in sorted(held)]
        train = [c for i, c in enumerate(train) if i not in held]
    return train, val


def render_samples(conversations: list, tokenizer, cfg: SFTConfig, run=None, label: str = "tokenised") -> list[Sample]:
    """chat/render.py decides the loss mask (assistant content plus end-of-turn token). With ``run``: a progress bar,
    and the result cached by data, template, tokenizer and rendering settings (Run.cached), so a rerun starts at
    once."""
    from instructkit.chat.render import Renderer
    from instructkit.training.loop import progress_bar

    renderer = Renderer.from_config(tokenizer, cfg.model.template, cfg.data)
    workers = cfg.data.num_workers

    def render() -> list:
        bar = progress_bar(len(conversations), 0, run is None or run.is_main, desc=label, unit="examples")
        if workers > 1 and len(conversations) > 1:
            out = _render_in_workers(conversations, tokenizer, cfg, workers, bar)
        else:
            out = []
            for conv in conversations:
                out += _render_one(renderer, conv, cfg.data.mask)
                bar.update(1)
        bar.close()
        return out

    if run is None or not conversations:
        rows = render()
    else:
        d = cfg.data
        rows = run.cached(label, [[c.to_dict() for c in conversations], renderer.template, tokenizer_fingerprint(
            tokenizer), d.mask, d.reasoning, d.train_tool_calls, d.chat_template_kwargs, cfg.model.template], render)
    return [Sample(ids, mask) for ids, mask in rows]


def _render_one(renderer, conv, mask: str) -> list:
    """[input_ids, loss_mask] rows of one conversation: one per sequence, several when the template re-renders
    earlier turns."""
    return [[list(r.input_ids), list(r.loss_mask)] for r in renderer.render_examples(conv, mask=mask)]


_WORKER_RENDERER = None  # in a tokenisation worker process: its Renderer, built once by _worker_init


def _worker_init(tokenizer, template, data_cfg) -> None:
    global _WORKER_RENDERER
    import torch

    from instructkit.chat.render import Renderer

    torch.set_num_threads(1)
    _WORKER_RENDERER = Renderer.from_config(tokenizer, template, data_cfg)


def _worker_render(chunk: list, mask: str) -> list:
    return [row for conv in chunk for row in _render_one(_WORKER_RENDERER, conv, mask)]


def _render_in_workers(conversations: list, tokenizer, cfg: SFTConfig, workers: int, bar) -> list:
    """``data.num_workers`` processes render and tokenise ``conversations``; the rows are the same, in the same order,
    as rendering them in this process.

    Chunks are contiguous slices taken in order and their results are concatenated in order (``Executor.map`` keeps
    it), so the output is the in-process output cut in pieces and glued back; four chunks per worker balance uneven
    conversation lengths. The workers are started with ``spawn`` (no fork of a process that may hold threads: torch's,
    a progress bar's); each one builds the same Renderer from the pickled tokenizer, template name and data settings.
    An error in a worker (a template that fails on a record, say) is re-raised here as the same exception with the
    same message. Starting the workers costs a few seconds (each imports transformers), so this pays off on tens of
    thousands of conversations, not on a handful."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n_chunks = min(len(conversations), 4 * workers)
    size = -(-len(conversations) // n_chunks)
    chunks = [conversations[i:i + size] for i in range(0, len(conversations), size)]
    out: list = []
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init,
                             initargs=(tokenizer, cfg.model.template, cfg.data)) as pool:
        for chunk, rows in zip(chunks, pool.map(_worker_render, chunks, [cfg.data.mask] * len(chunks))):
            out += rows
            bar.update(len(chunk))
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies a tokenizer's ids: its serialised fast tokenizer (or vocabulary) and its special tokens."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------------------------
def sft_batch_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, supervised tokens) of a packed micro-batch; the output layer sees only supervised positions, and
    its gradient is computed in the forward pass (losses.sft_loss_fused: same loss, a third fewer output-layer FLOPs)."""
    from instructkit.losses import sft_loss_fused
    from instructkit.models.load import causal_lm_parts, packed_hidden_states

    hidden = packed_hidden_states(model, batch)  # (B, T, H)
    _, head, softcap = causal_lm_parts(model)
    return sft_loss_fused(hidden, batch["labels"], head, softcap)


def count_supervised(batch) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_tokens(batch) -> int:
    return int(batch["n_tokens"])


# ---------------------------------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------------------------------
def write_samples(model, tokenizer, cfg: SFTConfig, run_dir: Path, step: int) -> None:
    """Greedy completions of ``train.sample_prompts`` appended to samples.jsonl (generation/engine.py)."""
    if not cfg.train.sample_prompts:
        return
    from instructkit.generation.engine import Engine, SamplingParams

    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer, template=cfg.model.template)
    # seed given: the engine then never draws from torch's global generator, so sampling cannot change training RNG
    params = SamplingParams(max_new_tokens=cfg.sample_max_new_tokens, temperature=0.0, seed=0, logprobs=False)
    outs = engine.chat([[{"role": "user", "content": p}] for p in cfg.train.sample_prompts], params)
    model.train(was_training)
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for p, o in zip(cfg.train.sample_prompts, outs):
            f.write(json.dumps({"step": step, "prompt": p, "completion": o.text, "finish_reason": o.finish_reason})
                    + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: SFTConfig) -> dict:
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.models.precision import log_precision
    from instructkit.training import loop, sharding
    from instructkit.training.run import Run, data_fingerprint

    run = Run.start(cfg, "sft", shardable=True, device=None, tokenize_workers=True)  # device None: a GPU if any
    precision, run_dir = run.precision, run.run_dir

    # -- data (read and checked before the model is loaded) -------------------------------------------------------------
    read_stats: dict = {}
    train_convs, val_convs = load_conversations(cfg, run_dir, read_stats)

    # -- model (before rendering: the template may add tokens) ---------------------------------------------------------
    log_precision(precision)
    model, tokenizer = load_model_and_tokenizer(run.model_config(), cfg.lora, precision=precision)
    model.train()
    model = run.prepare(model)  # activation checkpointing, FSDP2

    def train_loss(m, batch):
        batch = {k: v.to(precision.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with precision.autocast():
            return sft_batch_loss(m, batch)

    train_loss = sharding.route(train_loss)

    # -- render and pack ------------------------------------------------------------------------------------------------
    train_samples, train_stats = prepare_samples(render_samples(train_convs, tokenizer, cfg, run), cfg.data.max_length)
    val_samples, val_stats = prepare_samples(render_samples(val_convs, tokenizer, cfg, run, "tokenised validation"),
                                             cfg.data.max_length)
    run.check_data(read=read_stats, examples=train_stats.total, kept=train_stats.kept,
                   truncated=train_stats.truncated, dropped=dict(train_stats.dropped))
    if not train_samples:
        raise ConfigError(f"no training example has a supervised token left: {train_stats.as_dict()}")
    if run.is_main:
        (run_dir / "data_stats.json").write_text(json.dumps(
            {"train": train_stats.as_dict(), "validation": val_stats.as_dict()}, indent=1))
    rows = build_rows(train_samples, pack=cfg.train.pack, pack_length=cfg.train.pack_length, seed=cfg.data.seed)
    val_rows = build_rows(val_samples, pack=cfg.train.pack, pack_length=cfg.train.pack_length, seed=cfg.data.seed)
    pad_id = tokenizer.pad_token_id
    mbs = cfg.train.micro_batch_size
    my_val = val_rows[run.dist.rank::run.dist.world_size]
    val_batches = [collate_rows(my_val[i:i + mbs], pad_id) for i in range(0, len(my_val), mbs)]

    def validate(step: int) -> float | None:
        if not val_rows:
            return None
        val_loss, n = loop.evaluate(model, val_batches, train_loss, run.dist)
        run.log({"step": step, "val_loss": val_loss, "val_supervised_tokens": n})
        return val_loss

    def sample(step: int) -> None:
        with sharding.gathered(model) as inner:  # every rank: a sharded model is gathered for generation
            if run.is_main:
                write_samples(inner, tokenizer, cfg, run_dir, step)

    # -- loop -----------------------------------------------------------------------------------------------------------
    start = run.setup(model, n_items=len(rows), fingerprint=data_fingerprint(train_samples))
    total = run.total_steps
    for step in range(start, total):
        batches = [collate_rows([rows[i] for i in group], pad_id) for group in run.micro_batches(step)]
        res = run.optimizer_step(batches, train_loss, count_supervised, token_fn=count_tokens, step=step)
        done = step + 1
        run.after_step(done, run.step_record(done, res))  # log, progress bar, checkpoint
        if run.due("eval", done) and done < total:
            validate(done)
        if run.due("sample", done):
            sample(done)

    # -- final evaluation and save --------------------------------------------------------------------------------------
    val_loss = validate(total)
    if not (run.due("sample", total) and start < total):
        sample(total)
    c = run.counters
    if run.is_main and (c.empty_steps or c.empty_micro_batches):
        log.warning("%d steps and %d micro-batches had no supervised token", c.empty_steps, c.empty_micro_batches)
    return run.finish(model, tokenizer, {
        "val_loss": val_loss, "train_rows": len(rows), "train_examples": len(train_samples),
        "data": {"train": train_stats.as_dict(), "validation": val_stats.as_dict()}})
