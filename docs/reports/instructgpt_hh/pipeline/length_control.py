"""How much of PPO's win over SFT is length? Reads this folder's results.json (the pipeline's per-prompt scores,
lengths and end-of-turn flags for both policies) and prints the numbers quoted in ../README.md section 2.

    python docs/reports/instructgpt_hh/pipeline/length_control.py [docs/reports/instructgpt_hh/pipeline_length]
"""
import json
import statistics as st
import sys
from pathlib import Path


def corr(x, y):
    mx, my = st.mean(x), st.mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / (sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5


def win_rate(p, s, key, idx):
    wins = sum(p[key][i] > s[key][i] for i in idx)
    losses = sum(p[key][i] < s[key][i] for i in idx)
    return (wins + (len(idx) - wins - losses) / 2) / len(idx), wins, losses, len(idx)


def ols_policy_effect(s, p):
    """score = a + b length + c ended + d [PPO] by least squares over both policies' 2n responses (the pairing by
    prompt is ignored): d is PPO's effect at equal length and end-of-turn, with its standard error."""
    import numpy as np

    n = len(s["scores"])
    lengths = np.array(s["lengths"] + p["lengths"], dtype=float)
    ended = np.array([float(e) for e in s["ended"] + p["ended"]])
    x = np.column_stack([np.ones(2 * n), lengths, ended, np.r_[np.zeros(n), np.ones(n)]])
    for key, name in (("scores", "pipeline RM"), ("judge_scores", "judge")):
        y = np.array(s[key] + p[key])
        beta = np.linalg.lstsq(x, y, rcond=None)[0]
        resid = y - x @ beta
        se = np.sqrt(np.diag(resid @ resid / (2 * n - 4) * np.linalg.inv(x.T @ x)))
        print(f"{name}: score = {beta[0]:.2f} {beta[1]:+.3f} x length {beta[2]:+.2f} x ended "
              f"{beta[3]:+.2f} (se {se[3]:.2f}) x PPO")


def main():
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent  # pipeline/ or pipeline_length/
    pol = json.loads((folder / "results.json").read_text())["policies"]
    s, p = pol["sft"], pol["ppo"]
    n = len(s["scores"])
    for name, x in (("sft", s), ("ppo", p)):
        print(f"{name}: corr(RM score, length) {corr(x['scores'], x['lengths']):.2f}, "
              f"corr(judge score, length) {corr(x['judge_scores'], x['lengths']):.2f}")
    shorter = sum((p["lengths"][i] < s["lengths"][i]) == (p["judge_scores"][i] > s["judge_scores"][i])
                  for i in range(n))
    print(f"the shorter response wins under the judge on {shorter} of {n} prompts")
    both = [i for i in range(n) if s["ended"][i] and p["ended"][i]]
    print("both ended their turn: judge win rate %.3f (%d wins, %d losses of %d)" % win_rate(p, s, "judge_scores", both))
    print(f"  there, mean length SFT {st.mean(s['lengths'][i] for i in both):.1f} vs PPO "
          f"{st.mean(p['lengths'][i] for i in both):.1f} tokens; PPO shorter on "
          f"{sum(p['lengths'][i] < s['lengths'][i] for i in both)} of {len(both)}")
    close = [i for i in range(n) if p["lengths"][i] >= 0.7 * s["lengths"][i]]
    ols_policy_effect(s, p)
    print("PPO at least 0.7x as long as SFT: judge win rate %.3f (%d wins, %d losses of %d)"
          % win_rate(p, s, "judge_scores", close))


if __name__ == "__main__":
    main()
