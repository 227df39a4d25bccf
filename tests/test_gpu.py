"""The GPU path, wherever CUDA is present (``-m gpu``; every test here skips without CUDA): SFT full and LoRA in bf16
mixed precision, DPO, PPO and GRPO steps, greedy generation equal to transformers' ``generate``, the fused output-layer
loss against the plain cross entropy, and export of a bf16-trained model. bench/gpu_run.sh runs them on a lent GPU.

Tolerances: fp32 on the GPU is compared tightly (TF32 is off for these tests); bf16 results are compared against fp32
with bf16's resolution (8 mantissa bits: ~4e-3 relative per value, more after a few layers)."""

from __future__ import annotations

import math
import os

import pytest
import torch

# INSTRUCTKIT_GPU_TESTS_ON_CPU=1 runs these tests' logic on the CPU (a dry run of the GPU script, slow in bf16)
ON_CPU = os.environ.get("INSTRUCTKIT_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _precision(dtype=torch.bfloat16):
    from instructkit.models.precision import Precision

    return Precision(CUDA, dtype, str(dtype), "test")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sft_batches(tokenizer, n_rows: int = 4):
    """Packed rows of short chat samples (memorisable), the same every call."""
    from instructkit.chat.render import Renderer
    from instructkit.data.schema import Conversation, Message
    from instructkit.training.packing import Sample, build_rows, collate_rows

    renderer = Renderer(tokenizer)
    samples = []
    for i in range(12):
        conv = Conversation([Message("user", f"Compute {i} plus {i + 3}."),
                             Message("assistant", f"The answer is {2 * i + 3}.")])
        r = renderer.render(conv)
        samples.append(Sample(list(r.input_ids), list(r.loss_mask)))
    rows = build_rows(samples, pack=True, pack_length=128, seed=0)[:n_rows]
    return [collate_rows(rows[i:i + 2], tokenizer.pad_token_id) for i in range(0, len(rows), 2)]


def _sft_loss(model, batch):
    from instructkit.losses import sft_loss_fused
    from instructkit.models.load import causal_lm_parts, packed_hidden_states

    hidden = packed_hidden_states(model, batch)
    _, head, softcap = causal_lm_parts(model)
    return sft_loss_fused(hidden, batch["labels"], head, softcap)


def _train(model, batches, precision, steps: int, lr: float = 3e-3) -> list[float]:
    from instructkit.config import TrainConfig
    from instructkit.training import loop

    cfg = TrainConfig(lr=lr, schedule="constant", max_grad_norm=1.0)
    opt = loop.build_optimizer(model, cfg)
    sched = loop.build_scheduler(opt, cfg, steps)

    def loss_fn(m, b):
        with precision.autocast():
            return _sft_loss(m, _to(b, CUDA))

    losses = []
    for step in range(steps):
        res = loop.optimizer_step(model, opt, sched, batches, loss_fn, lambda b: int(b["n_supervised"]),
                                  max_grad_norm=1.0, step=step)
        losses.append(res.loss)
    return losses


def test_sft_full_bf16_mixed_precision(tiny_model_dir):
    """fp32 master weights and optimizer state, bf16 matmuls: the first loss equals fp32's within bf16 resolution and
    the loss falls on data the model can memorise."""
    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), precision=_precision())
    assert next(model.parameters()).device.type == CUDA.type
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    batches = _sft_batches(tok)
    ref, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), precision=_precision(torch.float32))
    with torch.no_grad():
        fp32_first = sum(_sft_loss(ref, _to(b, CUDA))[0].item() for b in batches)
        with _precision().autocast():
            bf16_first = sum(_sft_loss(model, _to(b, CUDA))[0].item() for b in batches)
    assert abs(bf16_first - fp32_first) <= 2e-2 * fp32_first
    losses = _train(model, batches, _precision(), steps=12)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0]
    opt_dtypes = {p.dtype for p in model.parameters()}
    assert opt_dtypes == {torch.float32}


def test_sft_lora_bf16_base_frozen_adapter_fp32(tiny_model_dir):
    from instructkit.config import LoRAConfig, ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)),
                                          LoRAConfig(enabled=True, r=8, alpha=16, dropout=0.0), precision=_precision())
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in base.values())
    assert all(p.dtype == torch.float32 for p in lora.values())
    losses = _train(model, _sft_batches(tok), _precision(), steps=12, lr=1e-2)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in base.items())
    assert any(not torch.equal(now[n], p) for n, p in lora.items())


@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_output_layer_loss_matches_reference(frozen_head):
    """sft_loss_fused (chunked, gradients in forward; frozen head: streaming) against F.cross_entropy over the full
    logits: fp32 within 1e-5, bf16 autocast within bf16 resolution."""
    from instructkit.losses import sft_loss_fused

    g = torch.Generator(device=CUDA).manual_seed(0)
    N, H, V = 300, 64, 5000
    hidden = torch.randn(2, N // 2, H, device=CUDA, generator=g)
    labels = torch.randint(0, V, (2, N // 2), device=CUDA, generator=g)
    labels[:, :10] = -100
    head = torch.nn.Linear(H, V, bias=False).to(CUDA)
    head.weight.requires_grad_(not frozen_head)
    results = {}
    for mode in ("fp32", "bf16"):
        for kind in ("fused", "reference"):
            h = hidden.clone().requires_grad_(True)
            head.zero_grad(set_to_none=True)
            ctx = torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=mode == "bf16")
            with ctx:
                if kind == "fused":
                    loss, n = sft_loss_fused(h, labels, head, chunk_rows=64)
                else:
                    mask = labels != -100
                    logits = head(h[mask]).float()
                    loss = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum")
            loss.backward()
            results[mode, kind] = (loss.detach().float(), h.grad.clone(),
                                   None if frozen_head else head.weight.grad.clone())
    for mode, rtol in (("fp32", 1e-5), ("bf16", 2e-2)):
        (lf, hf, wf), (lr_, hr, wr) = results[mode, "fused"], results[mode, "reference"]
        torch.testing.assert_close(lf, lr_, rtol=rtol, atol=0)
        torch.testing.assert_close(hf.float(), hr.float(), rtol=rtol, atol=1e-4 if mode == "fp32" else 2e-2)
        if wf is not None:
            torch.testing.assert_close(wf.float(), wr.float(), rtol=rtol, atol=1e-4 if mode == "fp32" else 2e-2)
    # bf16 against fp32: the loss keeps fp32 accumulation, so it is close to the fp32 value
    torch.testing.assert_close(results["bf16", "fused"][0], results["fp32", "reference"][0], rtol=1e-2, atol=0)


def test_greedy_generation_equals_transformers_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructkit.generation.engine import Engine, SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(CUDA).eval()
    prompts = [tok.encode(t) for t in ("Give three tips for staying healthy.", "What is the capital", "Hello")]
    ours = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0,
                                                               stop_token_ids=[]))
    for p, o in zip(prompts, ours):
        ref = model.generate(torch.tensor([p], device=CUDA), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id, min_new_tokens=20)
        assert o.token_ids == ref[0, len(p):].tolist()


def _pairs(tok, n=4):
    from instructkit.rl.rollout import prompt_response_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (int(k),), generator=g).tolist() for k in torch.randint(4, 12, (n,), generator=g)]
    chosen = [torch.randint(5, 400, (6,), generator=g).tolist() for _ in range(n)]
    rejected = [torch.randint(5, 400, (8,), generator=g).tolist() for _ in range(n)]
    batch = prompt_response_batch(prompts * 2, chosen + rejected, tok.pad_token_id)
    batch["n"] = n
    return batch


def test_dpo_step_bf16(tiny_model_dir):
    """At the start the policy equals the reference: the DPO loss is log 2; a few steps raise the chosen margin."""
    from instructkit.config import LoRAConfig, ModelConfig
    from instructkit.losses import dpo_loss
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.models.value_head import response_logprobs

    p = _precision()
    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)),
                                          LoRAConfig(enabled=True, r=8, alpha=16, dropout=0.0), precision=p)
    batch = _to(_pairs(tok), CUDA)

    def logps(m):
        with p.autocast():
            lp = response_logprobs(m, batch["input_ids"], batch["attention_mask"], batch["prompt_width"],
                                   batch["response_width"])
        s = (lp.float() * batch["response_mask"]).sum(-1)
        return s[:batch["n"]], s[batch["n"]:]

    with torch.no_grad(), model.disable_adapter():
        ref_c, ref_r = logps(model)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        c, r = logps(model)
        loss, metrics = dpo_loss(c, r, ref_c, ref_r, beta=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(2)) < 1e-3
    assert losses[-1] < losses[0]


def _lora_rollouts(tiny_model_dir, texts, max_new_tokens: int):
    """A LoRA policy in the test precision, one sampled response per prompt text (seed 0, no stop tokens), the
    prompt/response batch on the device, and ``logps()``: the responses' log-probs under the policy now, (B, R) fp32."""
    from instructkit.config import LoRAConfig, ModelConfig
    from instructkit.generation.engine import Engine, SamplingParams
    from instructkit.models.load import load_model_and_tokenizer
    from instructkit.models.value_head import response_logprobs
    from instructkit.rl.rollout import prompt_response_batch

    p = _precision()
    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)),
                                          LoRAConfig(enabled=True, r=8, alpha=16, dropout=0.0), precision=p)
    prompts = [tok.encode(t) for t in texts]
    model.eval()
    outs = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=0,
                                                               stop_token_ids=[]))
    model.train()
    batch = _to(prompt_response_batch(prompts, [o.token_ids for o in outs], tok.pad_token_id), CUDA)

    def logps():
        with p.autocast():
            return response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_width"],
                                     batch["response_width"]).float()

    return model, batch, logps


def test_ppo_step_with_generated_rollouts(tiny_model_dir):
    """Rollouts sampled on the GPU, their log-probs recomputed in bf16: the PPO ratio is 1 before the update (within
    bf16 noise), the clipped loss is finite and a step changes the policy."""
    from instructkit.losses import ppo_policy_loss

    model, batch, logps = _lora_rollouts(tiny_model_dir, ("Give three tips", "What is", "Hello there", "Write a poem"),
                                         max_new_tokens=12)
    with torch.no_grad():
        old = logps()
    rewards = torch.tensor([1.0, -1.0, 0.5, -0.5], device=CUDA)
    adv = rewards[:, None].expand_as(old) * batch["response_mask"]
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    loss, metrics = ppo_policy_loss(logps(), old, adv, batch["response_mask"].float())
    assert abs(metrics["ratio"].item() - 1.0) < 1e-2 and torch.isfinite(loss)
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(logps(), old)


def test_grpo_step(tiny_model_dir):
    """A GRPO update on the GPU: 2 prompts x 4 sampled responses, group-relative advantages from rule rewards, the
    clipped surrogate with the k3 KL to the reference (the LoRA base) in bf16: ratio 1 and KL 0 before the update,
    and the step raises the log-probability of the responses with positive advantage."""
    from instructkit.losses import clipped_policy_loss
    from instructkit.rl.advantage import group_advantages

    rows = [t for t in ("Give three tips", "Write a poem") for _ in range(4)]  # 2 prompts x a group of 4
    model, batch, logps = _lora_rollouts(tiny_model_dir, rows, max_new_tokens=10)
    mask = batch["response_mask"].float()
    with torch.no_grad():
        old = logps()
        with model.disable_adapter():
            ref = logps()
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 1.0, 0.0]], device=CUDA)
    adv = group_advantages(rewards).reshape(-1)  # (8,)
    assert adv.device.type == CUDA.type and torch.allclose(adv.view(2, 4).sum(1), torch.zeros(2, device=CUDA),
                                                           atol=1e-5)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    loss, metrics = clipped_policy_loss(logps(), old, adv, mask, ref_logprobs=ref, kl_coef=0.04)
    assert torch.isfinite(loss) and abs(metrics["ratio"].item() - 1.0) < 1e-2
    assert abs(metrics["kl"].item()) < 1e-2  # LoRA B starts at 0: the policy is its reference
    loss.backward()
    opt.step()
    with torch.no_grad():
        gain = ((logps() - old) * mask).sum(1)  # (8,) change of each response's log-probability
    assert (gain[adv > 0].mean() > gain[adv < 0].mean()).item()


def test_export_of_a_bf16_trained_model(tiny_model_dir, tmp_path):
    """Train in bf16 mixed precision, save final/ (fp32 master weights), reload with plain transformers: identical
    logits; the export command's checks pass on it (GGUF when the gguf package is present)."""
    from transformers import AutoModelForCausalLM

    from instructkit.config import ModelConfig
    from instructkit.models.load import load_model_and_tokenizer, save_model

    model, tok = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)), precision=_precision())
    _train(model, _sft_batches(tok), _precision(), steps=3)
    final = save_model(model, tok, tmp_path / "final")
    back = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).to(CUDA).eval()
    model.eval()
    ids = torch.tensor([tok.encode("Give three tips for staying healthy.")], device=CUDA)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    try:
        import gguf  # noqa: F401
    except ImportError:
        return
    from instructkit.models.export import export

    result = export(final, tmp_path / "export", gguf="f32")
    assert result["gguf_check"]


@pytest.mark.parametrize("sharding", ["none", "fsdp2"])
def test_sft_recipe_on_the_gpu_with_auto_precision(tmp_path, sharding):
    """`instructkit sft` with the default model.dtype (auto): on a CUDA GPU the run trains in bf16 on the GPU and says
    so in summary.json; the loss falls; with train.sharding=fsdp2 (a world of one) final/ is a full model."""
    import json
    import subprocess
    import sys

    from sft_helpers import ROOT, env, write_config

    cfg = write_config(tmp_path, "gpu", train={"max_steps": 12, "lr": 0.003, "sharding": sharding,
                                               "gradient_checkpointing": sharding == "fsdp2"})
    e = env()
    e.pop("INSTRUCTKIT_AUTO_DTYPE", None)  # the suite pins auto to fp32; here auto itself is under test
    p = subprocess.run([sys.executable, "-m", "instructkit", "sft", "--config", str(cfg)], env=e, cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "gpu" / "summary.json").read_text())
    if torch.cuda.is_available():
        assert summary["precision"]["dtype"] == "bfloat16" and summary["precision"]["device"].startswith("cuda")
    assert summary["last_loss"] < summary["first_loss"]
    assert (tmp_path / "runs" / "gpu" / "final" / "model.safetensors").exists()
