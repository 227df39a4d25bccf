"""What a run refuses before it trains, through the CLI: a config key no config has (with the nearest known key named),
and a chat template whose control tokens the model lacks when the new embedding rows would never be trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_SFT = str(ROOT / "configs" / "tiny_sft.yaml")


def _error(capsys) -> str:
    return capsys.readouterr().err


# ---- unknown config keys -------------------------------------------------------------------------------------------

def test_a_mistyped_override_names_the_nearest_key(capsys):
    assert main(["sft", "--config", TINY_SFT, "train.lrr=0.1"]) == 2
    err = _error(capsys)
    assert "override: unknown config key(s) train.lrr (train.lrr: did you mean 'train.lr'?)" in err
    assert main(["dpo", "--config", str(ROOT / "configs" / "tiny_dpo.yaml"), "model.templte=auto"]) == 2
    assert "model.templte: did you mean 'model.template'?" in _error(capsys)
    assert main(["quickstart", "model.path=tiny", "lora.rr=4"]) == 2  # the quickstart reads its config its own way
    assert "lora.rr: did you mean 'lora.r'?" in _error(capsys)


def test_a_mistyped_yaml_key_names_the_file_and_the_nearest_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  path: 'tiny:'\ntrian:\n  max_steps: 1\nlr: 0.1\nlora:\n  enabeld: true\n",
                   encoding="utf-8")
    assert main(["sft", "--config", str(cfg)]) == 2
    err = _error(capsys)
    # the top level is checked first: a misspelt section, and a key that belongs to another section
    assert f"{cfg}: unknown config key(s) lr, trian" in err
    assert "lr: did you mean 'train.lr'?" in err and "trian: did you mean 'train'?" in err
    cfg.write_text("model:\n  path: 'tiny:'\nlora:\n  enabeld: true\n", encoding="utf-8")
    assert main(["sft", "--config", str(cfg)]) == 2
    assert "lora.enabeld: did you mean 'lora.enabled'?" in _error(capsys)
    cfg.write_text("model:\n  path: 'tiny:'\nzzz_unrelated: 1\n", encoding="utf-8")
    assert main(["sft", "--config", str(cfg)]) == 2
    assert "zzz_unrelated: no known key is close" in _error(capsys)


# ---- a template that does not belong to the model ------------------------------------------------------------------

def _sft(tmp_path, *overrides: str) -> int:
    return main(["sft", "--config", TINY_SFT, f"train.output_dir={tmp_path}", "train.run_name=r", "train.max_steps=2",
                 "train.eval_every=0", "train.save_every=0", "train.sample_every=0", "data.sources=[{path: "
                 "builtin:quickstart_train, max_examples: 8}]", *overrides])


def test_lora_with_a_template_the_model_lacks_tokens_for_is_refused(tmp_path, capsys):
    # the tiny model speaks ChatML; Gemma's template needs <start_of_turn>/<end_of_turn>, which it does not have
    assert _sft(tmp_path, "model.template=gemma", "lora.enabled=true") == 2
    err = _error(capsys)
    assert "model.template='gemma' does not belong to" in err
    assert "<end_of_turn>" in err and "<start_of_turn>" in err
    assert "input embedding and output layer frozen" in err
    assert "model.template=auto" in err and "lora.modules_to_save=[embed_tokens,lm_head]" in err
    assert not (tmp_path / "r" / "final").exists()


def test_training_the_new_rows_is_accepted_and_saved_with_the_template(tmp_path, capsys):
    from safetensors.torch import load_file

    assert _sft(tmp_path, "model.template=gemma", "lora.enabled=true",
                "lora.modules_to_save=[embed_tokens,lm_head]") == 0
    final = tmp_path / "r" / "final"
    weights = load_file(final / "adapter_model.safetensors")
    tokenizer = json.loads((final / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert {"<start_of_turn>", "<end_of_turn>"} <= set(added)
    # the embedding and the output layer are saved in full, new rows included
    rows = {k: v.shape[0] for k, v in weights.items() if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    assert len(rows) == 2 and all(n > max(added.values()) for n in rows.values()), rows
    assert "<start_of_turn>" in (final / "chat_template.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("lora", [False, True])
def test_full_fine_tuning_trains_the_new_rows(tiny_model_dir, lora):
    from instructkit.config import ConfigError, LoRAConfig, ModelConfig
    from instructkit.models.load import load_model_and_tokenizer

    cfg = ModelConfig(path=str(tiny_model_dir), template="gemma")
    if lora:
        with pytest.raises(ConfigError, match="does not belong"):
            load_model_and_tokenizer(cfg, LoRAConfig(enabled=True))
    else:
        model, tok = load_model_and_tokenizer(cfg, LoRAConfig(enabled=False))
        assert model.get_input_embeddings().weight.shape[0] >= len(tok)
        assert model.get_input_embeddings().weight.requires_grad
