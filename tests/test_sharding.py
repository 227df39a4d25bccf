"""training/sharding.py (FSDP2): 2 CPU processes over gloo train like one process with the same global batch, in
lockstep, and gather a full model; the pieces in one process (a world of one).

FSDP2 works on CPU with gloo in torch 2.13 (forward, backward, fused AdamW on DTensor shards, clipping, full and
sharded state dicts), so the 2-process test runs the real thing: tests/sharding_worker.py under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructkit.training import loop, sharding

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_equal_one_process_sft_lora_dpo_and_resume(tmp_path):
    """Per-step losses and gradient norms of FSDP2 over 2 gloo processes equal one unsharded process with grad_accum
    x 2 (same rows per step) within 1e-5, for SFT (full, LoRA; the streaming and fused output-layer losses, per-sample
    packed attention, an empty micro-batch, a short last step) and DPO; the same supervised-token counts; validation in
    lockstep (uneven: 3 and 2 validation batches per rank); the gathered full state dict has every
    key of the model and equals the unsharded weights within 1e-5; resuming from full state dicts gathered after step 2
    equals the uninterrupted run bit for bit."""
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", "29531", str(ROOT / "tests" / "sharding_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2
    for key in ("sft", "sft_lora", "dpo"):
        e = r[key]
        assert len(e["sharded"]) == len(e["unsharded"]) >= 4
        for (l1, g1, u1), (l2, g2, u2) in zip(e["sharded"], e["unsharded"]):
            assert u1 == u2
            assert abs(l1 - l2) <= 1e-5 * abs(l2) and abs(g1 - g2) <= 1e-5 * abs(g2)
        (ev1, n1), (ev2, n2) = e["eval"]
        assert n1 == n2 and abs(ev1 - ev2) <= 1e-5 * abs(ev2)
        assert e["full_keys_match"] and e["full_max_diff"] < 1e-5
    assert r["resumed"] == r["sft"]["sharded"][2:]
    assert r["resumed_max_diff"] == 0.0


@pytest.fixture
def world_of_one():
    sharding.init_single_process_group()
    yield sharding.ShardedContext(0, 1)
    torch.distributed.destroy_process_group()


def test_world_of_one_wraps_layers_and_generates_gathered(world_of_one, tiny_model_dir):
    """The wrapping applied (one unit per decoder layer plus the root), the loss computed through the root equals the
    plain model's bit for bit, and generation inside ``gathered`` equals the unsharded model's."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    from instructkit.models.load import causal_lm_parts

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    root = sharding.shard_model(model, world_of_one)
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    assert len(units) == 1 + len(sharding.decoder_layers(model)) == 3
    assert sharding.unwrap(root) is model

    ids = torch.randint(5, 500, (2, 10))

    def loss_fn(m, x):
        body, head, _ = causal_lm_parts(m)
        return head(body(input_ids=x).last_hidden_state).logsumexp(-1).sum()

    assert torch.equal(sharding.route(loss_fn)(root, ids), loss_fn(plain, ids))
    prompt = ids[:1, :4]
    want = plain.generate(prompt, max_new_tokens=6, do_sample=False)
    with sharding.gathered(root) as inner:
        got = inner.generate(prompt, max_new_tokens=6, do_sample=False, synced_gpus=False)
    assert torch.equal(got, want)


def test_lockstep_pads_with_fillers(world_of_one):
    ctx = world_of_one
    with pytest.raises(RuntimeError, match="no micro-batch"):
        _empty_without_filler()
    assert ctx.lockstep_passes([("a", 3, True)]) == [("a", 3, True)]  # one rank: nothing to pad

    class Busier(sharding.ShardedContext):
        def all_reduce_max(self, value):  # another rank has 3 passes
            return 3

    two = Busier(1, 2)
    assert two.lockstep_passes([("b", 5, True)]) == [("b", 5, True), ("b", 0, False), ("b", 0, False)]
    assert two.lockstep_passes([]) == [("b", 0, False)] * 3  # the last batch it saw


def _empty_without_filler():
    class Two(sharding.ShardedContext):
        def all_reduce_max(self, value):  # another rank has 2 passes
            return 2

    return Two(1, 2).lockstep_passes([])


def test_sharding_needs_a_process_group_and_layers():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already up")
    with pytest.raises(RuntimeError, match="process group"):
        sharding.shard_model(torch.nn.Linear(2, 2), loop.DistContext())


@pytest.mark.parametrize("lora", [False, True])
def test_final_folder_of_a_sharded_model_is_a_full_model(world_of_one, tiny_model_dir, tmp_path, lora):
    """save_full_model writes what save_model writes for the unsharded model: a plain transformers folder (or a peft
    adapter folder) that loads to identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.config import LoRAConfig, ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    torch.manual_seed(0)
    cfg = LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0) if lora else None
    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), cfg)
    if lora:
        with torch.no_grad():  # a non-zero adapter, so the check sees it
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    ids = torch.randint(5, 500, (1, 8))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    root = sharding.shard_model(model, world_of_one)
    out = sharding.save_full_model(root, tok, tmp_path / "final", is_main=True)
    if lora:
        from peft import PeftModel

        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    else:
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(back.eval()(input_ids=ids).logits, want)
