"""`instructkit chat --model PATH`: talk to a model in the terminal, with its own chat template, streaming tokens.

Commands typed at the prompt: ``/reset`` (forget the conversation, keep the system prompt), ``/save FILE`` (the
conversation as internal JSON: ``{"messages": [...], "meta": {...}}``, readable by data/io.py), ``/exit`` (or Ctrl-D).
Every reply is generated from the whole history rendered by chat/render.py's Renderer (the template the model was
trained with) and stops at the template's end-of-turn token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "commands: /reset (new conversation), /save FILE (write it as JSON), /exit (quit)"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--model", required=True, help="model folder or zoo name")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--template", default="auto", help="chat template: auto (the tokenizer's own) or a built-in name")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_chat)


def _save(path: str, messages: list[dict[str, str]], args) -> None:
    from instructkit.data.schema import Conversation

    conv = Conversation.from_dict({"messages": messages, "meta": {"model": str(args.model), "source": "instructkit chat"}})
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    Path(path).expanduser().write_text(json.dumps(conv.to_dict(), ensure_ascii=False, indent=1) + "\n",
                                       encoding="utf-8")


def _chat(args) -> int:
    from instructkit.config import ModelConfig
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=args.model, template=args.template))
    engine = Engine(model, tokenizer, max_batch_size=1, template=args.template)
    stops = engine.chat_stop_token_ids()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    turn = 0
    print(f"chatting with {args.model} ({HELP})", flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                history = list(system)
                print("(new conversation)", flush=True)
            elif cmd == "/save":
                if not rest.strip():
                    print("usage: /save FILE", flush=True)
                    continue
                if not any(m["role"] == "assistant" for m in history):
                    print("(nothing to save yet)", flush=True)
                    continue
                try:
                    _save(rest.strip(), history, args)
                except (OSError, ValueError) as e:  # DataError is a ValueError: e.g. an empty reply in the history
                    print(f"could not save: {e}", flush=True)
                    continue
                print(f"saved {rest.strip()}", flush=True)
            else:
                print(HELP, flush=True)
            continue
        history.append({"role": "user", "content": line})
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, stop_token_ids=stops,
                                seed=args.seed + turn, logprobs=False)
        turn += 1
        pieces = []
        try:
            for piece in engine.stream(engine.chat_prompt_ids(history), params):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            sys.stdout.write(" [interrupted]")
        reply = "".join(pieces)
        out = getattr(engine, "last_stream_output", None)
        if out is not None and out.finish_reason == "length" and len(pieces):
            sys.stdout.write(" [max-new-tokens reached]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
