"""The SFT recipe through the CLI: full, LoRA and QLoRA for a few steps on data the model can memorise; outputs load
with plain transformers / peft; checkpoints reload to identical logits; non-finite stop; 2-process DDP."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructkit.cli import main as cli_main

from sft_helpers import ROOT, env, losses, write_config


def _run(tmp_path, name, capsys=None, **over) -> Path:
    cfg = write_config(tmp_path, name, **over)
    assert cli_main(["sft", "--config", str(cfg)]) == 0
    return tmp_path / "runs" / name


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _probe_ids(run_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    return tok.apply_chat_template([{"role": "user", "content": "Compute 3 plus 4."}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def test_full_finetune_learns_and_final_loads_with_transformers(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _run(tmp_path, "full", train={"max_steps": 30, "save_every": 10, "sample_every": 15,
                                        "sample_prompts": ["Compute 3 plus 4."]})
    train_curve = losses(run)
    assert len(train_curve) == 30
    assert all(math.isfinite(x) for x in train_curve)
    assert train_curve[-1] < 0.5 * train_curve[0]  # memorisable data: the loss more than halves in 30 steps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] is not None and summary["counters"]["empty_steps"] == 0
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["train"]["kept"] + stats["validation"]["kept"] == 24  # 24 conversations, 10% held out, none lost
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [15, 30]

    final = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    base_tok = AutoTokenizer.from_pretrained(run / "tiny_model")
    assert tok.chat_template == base_tok.chat_template and tok.pad_token != tok.eos_token
    # the last checkpoint (step 30) put into a fresh base model gives identical logits to final/
    fresh = AutoModelForCausalLM.from_pretrained(run / "tiny_model", dtype=torch.float32).eval()
    state = load_file(str(run / "checkpoints" / "step-30" / "trainable.safetensors"))
    fresh.load_state_dict(state, strict=True)
    ids = _probe_ids(run)
    assert torch.equal(_logits(final, ids), _logits(fresh, ids))
    assert not torch.equal(_logits(final, ids),
                           _logits(AutoModelForCausalLM.from_pretrained(run / "tiny_model").eval(), ids))


@pytest.mark.parametrize("quantize", [None, "int4"], ids=["lora", "qlora"])
def test_lora_trains_adapter_only_and_loads_with_peft(tmp_path, quantize):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if quantize:
        pytest.importorskip("bitsandbytes")
    lora = {"enabled": True, "r": 8, "alpha": 32, "dropout": 0.0, "quantize": quantize}
    run = _run(tmp_path, "lora", lora=lora, train={"max_steps": 30, "lr": 0.005, "save_every": 30})
    curve = [x for x in losses(run) if x is not None]
    assert all(math.isfinite(x) for x in curve) and curve[-1] < 0.85 * curve[0]  # frozen random output layer: LoRA learns slower
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: every B changed
    ckpt_state = load_file(str(run / "checkpoints" / "step-30" / "trainable.safetensors"))
    assert all("lora_" in k for k in ckpt_state)  # only the adapter was trainable

    base = AutoModelForCausalLM.from_pretrained(run / "tiny_model", dtype=torch.float32)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, run / "final").eval()
    # base weights did not change: the peft model's base layers equal the untouched base folder
    for k, v in model.get_base_model().state_dict().items():
        if "lora_" not in k:
            plain = k.replace(".base_layer", "")
            assert torch.equal(v, base_state[plain]), k
    ids = _probe_ids(run)
    plain_logits = _logits(AutoModelForCausalLM.from_pretrained(run / "tiny_model").eval(), ids)
    assert not torch.allclose(_logits(model, ids), plain_logits, atol=1e-4)
    if quantize is None:
        # the step-30 checkpoint put into a fresh LoRA model gives identical logits
        from instructkit.config import LoRAConfig
        from instructkit.models.load import apply_lora
        from instructkit.training.checkpoint import load_trainable_state_dict

        fresh = apply_lora(AutoModelForCausalLM.from_pretrained(run / "tiny_model", dtype=torch.float32),
                           LoRAConfig(enabled=True, r=8, alpha=32, dropout=0.0)).eval()
        load_trainable_state_dict(fresh, ckpt_state)
        assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_non_finite_loss_stops_the_run_without_a_later_checkpoint(tmp_path, monkeypatch, capsys):
    from instructkit.recipes import sft

    real = sft.sft_batch_loss
    calls = {"n": 0}

    def poisoned(model, batch):  # 2 micro-batches per step: calls 9-10 are step 5
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan") if calls["n"] >= 9 else loss), n

    monkeypatch.setattr(sft, "sft_batch_loss", poisoned)
    cfg = write_config(tmp_path, "nan", train={"max_steps": 10, "save_every": 2})
    assert cli_main(["sft", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "step 4: non-finite loss" in err  # 0-based step index 4 = the 5th update
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "nan" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-2", "step-4"]
    assert not (tmp_path / "runs" / "nan" / "final").exists()


def test_truncated_examples_are_dropped_with_a_count(tmp_path):
    # max_length 32 (rendered lengths are 31-80 tokens) cuts some conversations before their assistant answer (dropped) and others inside it (truncated)
    run = _run(tmp_path, "trunc", data={"max_length": 32, "validation_fraction": 0.0},
               train={"max_steps": 2, "pack_length": 32})
    stats = json.loads((run / "data_stats.json").read_text())["train"]
    assert stats["total"] == 24 and stats["kept"] + sum(stats["dropped"].values()) == 24
    assert stats["dropped"].get("no_supervised_tokens_after_truncation", 0) > 0 and stats["truncated"] > 0


def test_two_process_ddp_matches_one_process(tmp_path):
    """2 CPU processes (gloo, started by torchrun) x grad_accum 1 == 1 process x grad_accum 2, same global batch."""
    common = {"max_steps": 6, "micro_batch_size": 2, "eval_every": 3}
    single = write_config(tmp_path, "single", train={**common, "grad_accum": 2})
    multi = write_config(tmp_path, "multi", train={**common, "grad_accum": 1})
    p = subprocess.run([sys.executable, "-m", "instructkit", "sft", "--config", str(single)], env=env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), "-m", "instructkit", "sft", "--config", str(multi)],
                       env=env(), cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a = [json.loads(x) for x in (tmp_path / "runs" / "single" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "runs" / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 6 + 2  # 6 steps, validation at step 3 and at the end
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in ("loss", "val_loss", "grad_norm"):
            if ra.get(key) is not None:
                assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)
        if "supervised_tokens" in ra:
            assert ra["supervised_tokens"] == rb["supervised_tokens"] and ra["tokens"] == rb["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_model_packed_loss_and_lora_steps(tmp_path, name):
    """A real zoo model: the packed, supervised-positions-only loss equals the plain transformers forward (full logits,
    unpacked) on rendered conversations, and two LoRA SFT steps through the CLI run with a finite loss."""
    from instructkit.config import DataConfig, LoRAConfig, ModelConfig, SFTConfig
    from instructkit.data.builtin import load_builtin
    from instructkit.losses import sft_loss
    from instructkit.models.load import causal_lm_parts, load_model_and_tokenizer, packed_hidden_states
    from instructkit.recipes.sft import render_samples
    from instructkit.training.packing import collate_rows, prepare_samples

    template = "gemma" if name.startswith("gemma") else "auto"
    model, tok = load_model_and_tokenizer(ModelConfig(path=name, template=template))
    model.eval()
    cfg = SFTConfig(model=ModelConfig(path=name, template=template), data=DataConfig(max_length=96))
    samples, _ = prepare_samples(render_samples(load_builtin("quickstart_train")[:3], tok, cfg), 96)
    batch = collate_rows([samples], tok.pad_token_id)  # all three in one packed row
    _, head, cap = causal_lm_parts(model)
    with torch.no_grad():
        loss, n = sft_loss(packed_hidden_states(model, batch), batch["labels"], head, cap)
        ref = 0.0
        for s in samples:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            m = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
            ref += torch.nn.functional.cross_entropy(logits[m], torch.tensor(s.input_ids[1:])[m], reduction="sum")
    assert abs(loss.item() - ref.item()) / int(n) < 1e-4
    del model
    cfg_path = write_config(tmp_path, "real", model={"path": name, "template": template},
                            lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
                            data={"sources": [{"path": "builtin:quickstart_train", "max_examples": 8}],
                                  "max_length": 96, "validation_fraction": 0.0},
                            train={"max_steps": 2, "micro_batch_size": 1, "grad_accum": 1, "pack_length": 192,
                                   "threads": 2})
    assert cli_main(["sft", "--config", str(cfg_path)]) == 0
    curve = losses(tmp_path / "runs" / "real")
    assert len(curve) == 2 and all(math.isfinite(x) for x in curve)
