"""`instructkit export --model RUN_OR_MODEL --out DIR [--merge] [--adapter] [--gguf f32|q8_0|q4_K_M]`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained model: LoRA adapter, merged safetensors model, GGUF (f32, q8_0, q4_K_M) "
                       "with an Ollama Modelfile",
        description="Writes <out>/adapter (--adapter, the default for a LoRA adapter when nothing else is asked: "
                    "peft format, loads with PeftModel.from_pretrained), <out>/merged (--merge: "
                    "a plain transformers model folder, safetensors) and <out>/model-<type>.gguf (--gguf; Llama and "
                    "Gemma 3 architectures, verified by loading it back with transformers and comparing logits; "
                    "q4_K_M through llama.cpp's own quantiser, from llama-cpp-python) with an Ollama Modelfile beside "
                    "it. The chat template travels with every export.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="a run folder (its final/ is used), an adapter or model folder, a zoo name or a Hub id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base model (safetensors)")
    p.add_argument("--adapter", action="store_true", help="write the LoRA adapter in peft format (<out>/adapter)")
    p.add_argument("--gguf", type=str.lower, choices=["f32", "q8_0", "q4_k_m"], default=None,
                   help="also write a GGUF file of this type (and an Ollama Modelfile beside it)")
    p.add_argument("--system", default=None, help="system prompt for the Modelfile's SYSTEM line")
    p.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile beside the GGUF")
    p.add_argument("--no-verify", action="store_true", help="skip loading the GGUF back to compare logits")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from instructkit.models.export import ExportError, export

    try:
        result = export(args.model, args.out, merge=args.merge, adapter=args.adapter, gguf=args.gguf,
                        verify=not args.no_verify, modelfile=not args.no_modelfile, system=args.system)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if "verification failed" in str(e) else 2
    print(json.dumps(result, indent=1))
    return 0
