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


# ---------------------------------------------------------------------------------------------------------------------
# Through the SFT recipe (CLI): train.sharding=fsdp2
# ---------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_sft_fsdp2_two_processes_equal_one_unsharded_process(tmp_path):
    """`torchrun --nproc_per_node 2 ... train.sharding=fsdp2` x grad_accum 1 == one unsharded process x grad_accum 2:
    per-step losses, gradient norms and validation losses within 1e-5, the same token counts; final/ is a full model
    (plain transformers folder) with the unsharded run's weights within 1e-5; summary.json says fp32 and fsdp2."""
    from safetensors.torch import load_file
    from sft_helpers import env, write_config

    common = {"max_steps": 6, "micro_batch_size": 2, "eval_every": 3}
    single = write_config(tmp_path, "single", train={**common, "grad_accum": 2})
    multi = write_config(tmp_path, "multi", train={**common, "grad_accum": 1, "sharding": "fsdp2"})
    for cmd in ([sys.executable], _torchrun(2)):
        cfg = single if cmd == [sys.executable] else multi
        p = subprocess.run(cmd + ["-m", "instructkit", "sft", "--config", str(cfg)], env=env(), cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = _records(tmp_path / "runs" / "single"), _records(tmp_path / "runs" / "multi")
    assert len(a) == len(b) == 6 + 2
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in ("loss", "val_loss", "grad_norm"):
            if ra.get(key) is not None:
                assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (key, ra, rb)
        if "supervised_tokens" in ra:
            assert (ra["supervised_tokens"], ra["tokens"]) == (rb["supervised_tokens"], rb["tokens"])
    wa = load_file(str(tmp_path / "runs" / "single" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "runs" / "multi" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-5 for k in wa)
    summary = json.loads((tmp_path / "runs" / "multi" / "summary.json").read_text())
    assert summary["sharding"] == "fsdp2" and summary["precision"]["dtype"] == "float32"


def _kill_when(cmd: list[str], run_dir: Path, step: int) -> None:
    import signal
    import time

    from sft_helpers import env

    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
            if any(r.get("step", 0) >= step for r in lines):
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
                break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run was not killed mid-way: {proc.stderr.read()[-2000:]}"
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sft_fsdp2_sigkill_then_resume_equals_uninterrupted(tmp_path, processes):
    """A sharded run (with activation checkpointing) killed with SIGKILL after step 5 and resumed from its last
    checkpoint (step 4: full state gathered on rank 0, scattered back on resume) equals the uninterrupted sharded run
    bit for bit: per-step losses and final/ weights. One process in CI (FSDP2 over a world of one), 2 under slow."""
    from safetensors.torch import load_file
    from sft_helpers import env, write_config

    train = {"max_steps": 10, "micro_batch_size": 2, "grad_accum": 2 // processes, "save_every": 2,
             "sharding": "fsdp2", "gradient_checkpointing": True}
    prefix = [sys.executable] if processes == 1 else _torchrun(processes)
    ref = write_config(tmp_path, "ref", train=train)
    p = subprocess.run(prefix + ["-m", "instructkit", "sft", "--config", str(ref)], env=env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = write_config(tmp_path, "killed", train=train)
    run_dir = tmp_path / "runs" / "killed"
    _kill_when((prefix if processes == 1 else _torchrun(processes)) + ["-m", "instructkit", "sft", "--config",
                                                                       str(cfg)], run_dir, 5)
    p = subprocess.run((prefix if processes == 1 else _torchrun(processes)) + ["-m", "instructkit", "sft", "--config",
                                                                               str(cfg)],
                       env=env(), cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = lambda d: [r["loss"] for r in _records(d) if "loss" in r]  # noqa: E731
    assert losses(run_dir) == losses(tmp_path / "runs" / "ref") and len(losses(run_dir)) == 10
    a = load_file(str(tmp_path / "runs" / "ref" / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_recipe_without_sharding_refuses_it(tmp_path):
    """Every training recipe applies train.sharding and train.gradient_checkpointing now; one that does not declare
    it (Run.start without shardable=True) refuses them with the reason, never silently ignores them."""
    import instructkit.config as C
    from instructkit.training.run import Run

    for override in ("train.sharding=fsdp2", "train.gradient_checkpointing=true"):
        cfg = C.load_config(C.DPOConfig, None, [override, "model.path=x", f"train.output_dir={tmp_path}"])
        with pytest.raises(C.ConfigError, match="not available in `new-recipe`"):
            Run.start(cfg, "new-recipe")
