"""`instructkit export --model RUN_OR_MODEL_DIR --out DIR [--merge] [--adapter] [--gguf f32|q8_0]`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained model: LoRA adapter, merged safetensors model, GGUF (f32, q8_0)",
        description="Writes <out>/adapter (--adapter, the default for a LoRA adapter when nothing else is asked: "
                    "peft format, loads with PeftModel.from_pretrained), <out>/merged (--merge: "
                    "a plain transformers model folder, safetensors) and <out>/model-<type>.gguf (--gguf; Llama "
                    "architecture, verified by loading it back with transformers and comparing logits). The chat "
                    "template travels with every export.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a run folder (its final/ is used), an adapter or a model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base model (safetensors)")
    p.add_argument("--adapter", action="store_true", help="write the LoRA adapter in peft format (<out>/adapter)")
    p.add_argument("--gguf", choices=["f32", "q8_0"], default=None, help="also write a GGUF file of this type")
    p.add_argument("--no-verify", action="store_true", help="skip loading the GGUF back to compare logits")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit.models.export import ExportError, export

    try:
        result = export(args.model, args.out, merge=args.merge, adapter=args.adapter, gguf=args.gguf,
                        verify=not args.no_verify)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if "verification failed" in str(e) else 2
    print(json.dumps(result, indent=1))
    return 0
