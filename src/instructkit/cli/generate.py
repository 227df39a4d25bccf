"""`instructkit serve`, `instructkit generate`, `instructkit self-instruct`: generation from a model."""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server (Starlette on uvicorn): /v1/chat/completions and /v1/completions "
                    "(streaming, n, logprobs, echo), /v1/models, /health, /tokenize, /detokenize. Concurrent "
                    "requests are batched into the engine. Binds 127.0.0.1 unless --host says otherwise; the model's "
                    "own chat template is applied.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, run folder, zoo name or Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require 'Authorization: Bearer <key>' with the key read from this environment variable")
    p.add_argument("--name", default=None, help="model name clients send (default: the --model value)")
    p.add_argument("--template", default="auto", help="chat template: auto (the tokenizer's own) or a built-in name")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000, help="largest request body accepted")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt accepted")
    p.add_argument("--max-batch-rows", type=int, default=64,
                   help="rows (prompts x choices) of concurrent requests decoded together")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument("--idle-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run_serve)

    g = subparsers.add_parser(
        "generate", help="generate completions for prompts (batched, KV cache)",
        description="Generate for each --prompt (or each line of --input: a JSON string, {\"prompt\": ...} or "
                    "{\"messages\": [...]}) and print one JSON line per prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", required=True, help="model folder or zoo name")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--input", default=None, help="JSONL file of prompts")
    g.add_argument("--output", default=None, help="write JSONL here instead of stdout")
    g.add_argument("--chat", action="store_true", help="treat each --prompt as a user message (chat template)")
    g.add_argument("--template", default="auto", help="chat template for --chat and messages")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=16)
    g.set_defaults(func=run_generate)

    s = subparsers.add_parser(
        "self-instruct", help="grow an instruction data set from seed tasks with an LLM (Self-Instruct)",
        description="Self-Instruct: instruction generation with a ROUGE-L novelty filter, classification-aware "
                    "instance generation, export to internal JSONL and a report. Resumable: rerun to continue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--config", "-c", default=None, help="YAML config file (see configs/self_instruct.yaml)")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    s.set_defaults(func=run_self_instruct)


def run_serve(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from instructkit.generation.server import ServerLimits, load_server

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            print(f"error: environment variable {args.api_key_env} is not set or empty", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_tokens_limit=args.max_tokens_limit,
                          max_prompt_tokens=args.max_prompt_tokens,
                          default_max_tokens=min(256, args.max_tokens_limit), max_batch_rows=args.max_batch_rows,
                          request_timeout_s=args.request_timeout, idle_timeout_s=args.idle_timeout)
    server = load_server(args.model, host=args.host, port=args.port, api_key=key, template=args.template,
                         name=args.name, limits=limits)
    host, port = server.address
    # one machine-readable line first, so scripts and tests can find a port picked with --port 0
    print(json.dumps({"serving": server.model_name, "url": f"http://{host}:{port}/v1",
                      "auth": bool(key)}), flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: reachable from other machines", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _read_prompt_file(path: str) -> list:
    from instructkit.data.schema import DataError

    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg})", path, n) from None
            if isinstance(obj, str):
                items.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                items.append(obj["prompt"])
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                items.append(obj["messages"])
            else:
                raise DataError("expected a JSON string, {\"prompt\": str} or {\"messages\": [...]}", path, n)
    return items


def run_generate(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit.generation.backends import LocalBackend
    from instructkit.generation.engine import SamplingParams

    requests: list = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    if args.input:
        requests += _read_prompt_file(args.input)
    if not requests:
        print("error: give --prompt or --input", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                stop_strings=tuple(args.stop), seed=args.seed, logprobs=False)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = LocalBackend.from_path(args.model, template=args.template, max_batch_size=args.batch_size)
    texts = backend.complete(requests, params)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for req, text in zip(requests, texts):
            out.write(json.dumps({"prompt": req, "completion": text}, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def run_self_instruct(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit.config import SelfInstructConfig, load_config
    from instructkit.recipes import self_instruct

    cfg = load_config(SelfInstructConfig, args.config, args.overrides)
    try:
        summary = self_instruct.main(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:  # e.g. an API-key variable that is not set
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("run_dir", "data", "exported")}))
    return 0
