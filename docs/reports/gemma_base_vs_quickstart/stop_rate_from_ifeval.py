"""Stop rate / length stats / refusal rate on the SAME IFEval responses (workaround: `evaluate ifeval` keeps only text,
so a response is counted as stopped when its re-tokenised length < max_new_tokens - 1)."""
import json, sys, statistics
from transformers import AutoTokenizer
from instructkit.eval.metrics import is_refusal
from instructkit.eval.report import save_eval

rows_path, tok_dir, max_new, save_dir, model_name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
tok = AutoTokenizer.from_pretrained(tok_dir)
rows = [json.loads(l) for l in open(rows_path) if l.strip()]
lens = [len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
stopped = [n < max_new - 1 for n in lens]
words = [len(r["response"].split()) for r in rows]
m = {"stop_rate": sum(stopped) / len(rows), "responses": len(rows),
     "mean_response_tokens": statistics.mean(lens), "median_response_tokens": statistics.median(lens),
     "max_response_tokens": max(lens), "mean_response_words": statistics.mean(words),
     "empty_rate": sum(1 for r in rows if not r["response"].strip()) / len(rows),
     "refusal_rate_ifeval": sum(is_refusal(r["response"]) for r in rows) / len(rows)}
save_eval(save_dir, "responses", m, details={"source": "IFEval responses (ifeval.json samples)", "max_new_tokens": max_new,
          "stop_rule": "re-tokenised response length < max_new_tokens - 1", "lengths_tokens": lens}, model=model_name)
print(json.dumps(m))
