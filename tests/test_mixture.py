"""Mixing: rates against hand computations, exact counts, determinism, the YAML form."""

import json
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructkit.config import ConfigError
from instructkit.data.mixture import allocate, load_mixture_config, mix, mix_from_config, mixing_rates


def sources(**sizes):
    return {name: [f"{name}{i}" for i in range(n)] for name, n in sizes.items()}


def test_weighted_rates_and_counts():
    # weights 3:1 -> rates 0.75, 0.25; total 10 -> 7.5 and 2.5: floors 7 + 2 = 9, the one left goes to the larger
    # remainder; both remainders are 0.5, so the tie goes to the source listed first -> 8, 2.
    m = mix(sources(a=100, b=100), weights={"a": 3, "b": 1}, total=10, seed=0)
    assert m.rates == {"a": 0.75, "b": 0.25}
    assert m.counts == {"a": 8, "b": 2}
    assert Counter(x[0] for x in m.examples) == {"a": 8, "b": 2}


def test_proportional_cap_temperature_one():
    # sizes 100 and 10000, cap 1000: min() -> 100, 1000 -> rates 1/11, 10/11; total 110 -> exactly 10 and 100.
    m = mix(sources(small=100, big=10000), strategy="proportional", cap=1000, total=110)
    assert m.rates["small"] == pytest.approx(1 / 11, abs=1e-12)
    assert m.rates["big"] == pytest.approx(10 / 11, abs=1e-12)
    assert m.counts == {"small": 10, "big": 100}


def test_proportional_temperature_two():
    # T = 2: sqrt(100) = 10, sqrt(1000) = 31.6227766 -> rates 0.2402531, 0.7597469 (10 / 41.6227766);
    # total 1000 -> 240.25 -> 240 and 759.75 -> 760.
    rates = mixing_rates({"small": 100, "big": 10000}, "proportional", cap=1000, temperature=2.0)
    assert rates["small"] == pytest.approx(10 / (10 + math.sqrt(1000)), abs=1e-12)
    assert rates["small"] == pytest.approx(0.2402531, abs=1e-7)
    assert allocate(1000, rates) == {"small": 240, "big": 760}


def test_temperature_flattens_toward_equal():
    sizes = {"a": 10, "b": 1000}
    r1 = mixing_rates(sizes, "proportional", temperature=1.0)
    r100 = mixing_rates(sizes, "proportional", temperature=100.0)
    assert r1["a"] == pytest.approx(10 / 1010)
    assert abs(r100["a"] - 0.5) < 0.02 and r100["a"] > r1["a"]


def test_upsampling_repeats_whole_copies_evenly():
    # 2 copies of all 3 "s" examples + 1 random one: counts per example are 2 or 3, never 0 or 4.
    m = mix(sources(s=3, t=3), weights={"s": 1, "t": 0}, total=7)
    assert m.counts == {"s": 7, "t": 0}
    per = Counter(m.examples)
    assert sorted(per.values()) == [2, 2, 3]


def test_deterministic_by_seed_and_independent_per_source():
    base = sources(a=50, b=50)
    m1 = mix(base, total=40, seed=1)
    m2 = mix(base, total=40, seed=1)
    m3 = mix(base, total=40, seed=2)
    assert m1.examples == m2.examples
    assert m1.examples != m3.examples
    # Adding a source with weight 0 does not change which examples a and b contribute.
    m4 = mix({**base, "c": ["c0"]}, weights={"a": 1, "b": 1, "c": 0}, total=40, seed=1)
    assert sorted(m4.examples) == sorted(m1.examples)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.integers(0, 50), min_size=1, max_size=5),
    total=st.integers(0, 300),
    temperature=st.floats(0.1, 10),
    cap=st.one_of(st.none(), st.integers(1, 60)),
)
def test_property_counts_sum_to_total(sizes, total, temperature, cap):
    if not any(sizes.values()):
        with pytest.raises(ConfigError, match="every source is empty"):
            mix(sources(**sizes), strategy="proportional", total=total)
        return
    m = mix(sources(**sizes), strategy="proportional", total=total, temperature=temperature, cap=cap)
    assert sum(m.counts.values()) == total == len(m.examples)
    assert math.isclose(sum(m.rates.values()), 1.0, rel_tol=1e-9)
    for name, n in sizes.items():
        assert abs(m.counts[name] - total * m.rates[name]) < 1.0  # largest remainder: within one of exact
        if n == 0:
            assert m.counts[name] == 0


def test_bad_parameters():
    with pytest.raises(ConfigError, match="strategy must be one of"):
        mixing_rates({"a": 1}, "random")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        mixing_rates({"a": 1}, "proportional", temperature=0)
    with pytest.raises(ConfigError, match="weight must be a finite number >= 0"):
        mixing_rates({"a": 1}, "weighted", weights={"a": -1})


def test_yaml_config_and_relative_paths(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "data" / "b.json").write_text(json.dumps([{"instruction": f"i{i}", "output": f"o{i}"} for i in range(10)]))
    cfg_file = tmp_path / "mix.yaml"
    cfg_file.write_text(
        "strategy: weighted\ntotal: 20\nseed: 5\nsources:\n"
        "  - {path: data/a.jsonl, weight: 1.0, max_examples: 12}\n"
        "  - {path: data/b.json, format: alpaca, weight: 3.0}\n"
    )
    cfg = load_mixture_config(cfg_file)
    m = mix_from_config(cfg, base_dir=tmp_path)
    # sizes 12 (capped by max_examples) and 10; weights 1:3 -> 5 and 15 (b repeats: 10 + 5).
    assert m.sizes == {"a": 12, "b": 10} and m.counts == {"a": 5, "b": 15}
    assert all(int(e.messages[0].content[1:]) < 12 for e in m.examples if e.meta["format"] == "prompt_completion")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_mixture_config(cfg_file, ["sourcez=1"])


def test_source_skip_slices_a_mixture_source(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg_file = tmp_path / "mix.yaml"
    cfg_file.write_text("strategy: proportional\nsources:\n  - {path: a.jsonl, skip: 20, max_examples: 5}\n")
    m = mix_from_config(load_mixture_config(cfg_file), base_dir=tmp_path)
    assert sorted(int(e.messages[0].content[1:]) for e in m.examples) == [20, 21, 22, 23, 24]
