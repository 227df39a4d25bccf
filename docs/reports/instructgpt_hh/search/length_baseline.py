"""Accuracy of "the shorter response is the chosen one" on the exact held-out pairs of reward-model configs.

Usage (from the repository root): python docs/reports/instructgpt_hh/search/length_baseline.py CONFIG[::key=value...] ...
"""
import json, sys, tempfile
from pathlib import Path
from transformers import AutoTokenizer
from instructkit.config import load_config, RewardModelConfig
from instructkit.data.sources import read_sources
from instructkit.recipes.reward_model import split_groups
from instructkit.data.preference import encode_groups
from instructkit.chat.render import Renderer
from instructkit.models import zoo
tok = AutoTokenizer.from_pretrained(str(zoo.cache_dir("smollm2-135m-instruct")))
out = {}
for cfg_path, overrides in [(a.split("::")[0], a.split("::")[1:]) for a in sys.argv[1:]]:
    cfg = load_config(RewardModelConfig, cfg_path, overrides)
    tmp = tempfile.mkdtemp()  # where a skip_invalid read writes its rejects
    pairs, _ = read_sources(cfg.data, cfg.data.sources, tmp)
    train, val, _ = split_groups(pairs, cfg.data, tmp)
    r = Renderer.from_config(tok, cfg.model.template, cfg.data)
    items, _ = encode_groups(r, val, cfg.data.max_length)
    score = []
    for g in items:
        for b, w in g.pairs:
            lb, lw = len(g.responses[b]), len(g.responses[w])
            score.append(1.0 if lb < lw else 0.0 if lb > lw else 0.5)
    out[cfg_path + " " + " ".join(overrides)] = {"pairs": len(score), "shorter_is_chosen_accuracy": sum(score) / len(score)}
print(json.dumps(out, indent=1))
