"""spac.bench.replay, scripts/bench.py's trace replay (the MODELLED part), on a small synthetic trace:
invariants that hold whatever the profile's costs are. No ONNX Runtime, no package: a few seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from spac.bench import replay as bench
from spac.bench.measure import CONFIGS
from spac.bench.trace import TraceRecorder, trace_frequencies
from spac.runtime.profile import load_profile

LAYERS, EXPERTS, TOP_K, GAMMA = 3, 8, 2, 4
BUDGETS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
SCALE = bench.Scale("test", expert_bytes=2_000_000, trunk_bytes=20_000_000, draft_bytes=4_000_000,
                    layers=LAYERS, experts=EXPERTS, top_k=TOP_K, draft_layers=2)


def routing(rng, tokens: int, favourite: np.ndarray) -> np.ndarray:
    """counts[layer, expert] for one pass: each token picks TOP_K distinct experts per layer,
    mostly among the layer's current favourites (temporal locality, like a trained model)."""
    counts = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    for layer in range(LAYERS):
        weights = np.ones(EXPERTS)
        weights[favourite[layer]] += 12
        for _ in range(tokens):
            chosen = rng.choice(EXPERTS, size=TOP_K, replace=False, p=weights / weights.sum())
            counts[layer, chosen] += 1
    return counts


def synthetic_trace(speculative: bool, seed: int = 0, prompts: int = 3, new_tokens: int = 24) -> dict:
    rng = np.random.default_rng(seed)
    favourite = rng.integers(0, EXPERTS, size=(LAYERS, 2))
    out = []
    for index in range(prompts + 1):  # the first is the warm-up prompt
        rounds = [{"kind": "prefill", "tokens": 12, "accepted": None,
                   "counts": routing(rng, 12, favourite).tolist()}]
        produced = 1
        while produced < new_tokens:
            if rng.random() < 0.2:  # the favourites drift
                favourite[rng.integers(LAYERS), rng.integers(2)] = rng.integers(EXPERTS)
            if speculative:
                accepted = int(rng.integers(0, GAMMA + 1))
                rounds.append({"kind": "verify", "tokens": GAMMA + 1, "accepted": accepted,
                               "counts": routing(rng, GAMMA + 1, favourite).tolist()})
                produced += accepted + 1
            else:
                rounds.append({"kind": "decode", "tokens": 1, "accepted": 0,
                               "counts": routing(rng, 1, favourite).tolist()})
                produced += 1
        out.append({"name": f"p{index}", "warmup": index == 0, "new_tokens": new_tokens, "rounds": rounds})
    return {"model": {"moe_layers": LAYERS, "num_experts": EXPERTS, "top_k": TOP_K}, "prompts": out}


@pytest.fixture(scope="module")
def traces():
    return {"sd": synthetic_trace(True), "no-sd": synthetic_trace(False), "calibration": synthetic_trace(True, seed=1)}


@pytest.mark.parametrize("profile_name", ["cpu-only", "rtx4090-desktop", "jetson-orin-agx-64gb"])
def test_replay_invariants(traces, profile_name):
    profile = load_profile(profile_name)
    frequencies = trace_frequencies(traces["calibration"])
    for name, speculative, policy, estimator in CONFIGS:
        trace = traces["sd" if speculative else "no-sd"]
        rows = [bench.replay(trace, policy, b, profile, SCALE, estimator, frequencies) for b in BUDGETS]
        rates = [r["hit_rate"] for r in rows]
        for r in rows:
            assert r["tokens_per_second"] > 0, (name, r)
            assert 0.0 <= r["hit_rate"] <= 1.0
            assert r["prefetch"]["used"] <= r["prefetch"]["issued"]
            # Every prompt but the warm-up is timed, each for new_tokens - 1 decode tokens.
            assert r["tokens"] == 3 * 23
        if policy in ("lru", "static"):  # LRU's stack property; static's nested resident sets
            assert all(a <= b + 1e-12 for a, b in zip(rates, rates[1:])), (name, rates)
        assert rates[0] == 0.0, name  # no slot, no hit
        assert rows[-1]["hit_rate"] == 1.0, name  # a budget that holds every expert: all hits
        assert rows[-1]["stall_ms"] == 0.0
        # With every expert cached nothing is read, so the policy cannot matter.
        assert rows[-1]["tokens_per_second"] == pytest.approx(
            bench.replay(trace, "static", 1.0, profile, SCALE, None, frequencies)["tokens_per_second"])
        if policy == "spac":
            assert rows[2]["prefetch"]["issued"] > 0, name


def test_more_budget_is_not_slower_for_lru_and_static(traces):
    """Costs are per miss, so where the hit rate cannot fall the modelled time cannot rise."""
    profile = load_profile("cpu-only")
    frequencies = trace_frequencies(traces["calibration"])
    for policy, trace in (("lru", traces["no-sd"]), ("static", traces["sd"])):
        speeds = [bench.replay(trace, policy, b, profile, SCALE, None, frequencies)["tokens_per_second"]
                  for b in BUDGETS]
        assert all(a <= b * (1 + 1e-9) for a, b in zip(speeds, speeds[1:])), (policy, speeds)


def test_speculation_pays_when_drafts_are_accepted():
    """The same routing with every draft accepted gives more tokens per modelled second."""
    profile = load_profile("rtx4090-desktop")
    trace = synthetic_trace(True, seed=3)
    accepted = {**trace, "prompts": [{**p, "new_tokens": None, "rounds": [
        {**r, "accepted": GAMMA if r["kind"] == "verify" else r["accepted"]} for r in p["rounds"]]}
        for p in trace["prompts"]]}
    rejected = {**trace, "prompts": [{**p, "new_tokens": None, "rounds": [
        {**r, "accepted": 0 if r["kind"] == "verify" else r["accepted"]} for r in p["rounds"]]}
        for p in trace["prompts"]]}
    fast = bench.replay(accepted, "lru", 0.5, profile, SCALE)["tokens_per_second"]
    slow = bench.replay(rejected, "lru", 0.5, profile, SCALE)["tokens_per_second"]
    assert fast > 2 * slow


def test_replay_profile_labels_its_figures_as_modelled(traces):
    rep = bench.replay_profile(traces, "rtx4090-desktop", (0.1, 1.0), SCALE,
                               trace_frequencies(traces["calibration"]))
    assert rep["note"] == bench.MODELLED == "MODELLED, not measured"
    assert rep["swept_tier"] == "device"
    assert set(rep["policies"]) == {name for name, *_ in CONFIGS}


def test_qwen3_scale_matches_the_published_sizes():
    scale = bench.qwen3_30b_a3b()
    assert scale.expert_bytes * scale.layers * scale.experts == pytest.approx(58e9, rel=0.02)  # ≈ 29 B params, bf16
    assert 2.0e9 < scale.trunk_bytes < 3.5e9


def test_trace_recorder_settles_acceptance_from_cache_lengths():
    """A fake runner stands in for ModelRunner: lengths as speculative decoding leaves them, and
    the cache reset that the next prompt's prefill begins with."""

    class Runner:
        length = 0

        def forward(self, tokens):
            self.on_routing(0, np.array([[0, 1]] * len(tokens)))

        def reset(self):
            self.length = 0

    class FakeRuntime:
        class manifest:  # noqa: N801
            class target:  # noqa: N801
                moe_layers = [0]
                dims = {"num_experts": 4}

        target = Runner()

    runtime = FakeRuntime()
    recorder = TraceRecorder(runtime, speculative=True)
    runner = runtime.target
    for prompt in range(2):
        runner.reset()  # what Decoder.prefill does first
        runner.forward([1] * 10)  # prefill of 10: the cache then holds the 10 prompt tokens
        runner.length = 10
        runner.forward([1] * 5)  # verify 1 + γ=4: 2 accepted -> 10 + 1 + 2 cached
        runner.length = 13
        runner.forward([1] * 5)  # all 4 accepted -> 13 + 1 + 4
        runner.length = 18
    trace = recorder.trace(["p", "q"], [9, 9], warmup=1)
    assert [p["warmup"] for p in trace] == [True, False]
    for prompt in trace:
        rounds = prompt["rounds"]
        assert [r["kind"] for r in rounds] == ["prefill", "verify", "verify"]
        assert [r["accepted"] for r in rounds] == [None, 2, 4]
        assert rounds[1]["counts"] == [[5, 5, 0, 0]]


# ---------------------------------------------------------------------------------------------
# scripts/gpu_check.sh: its dry run (tiny shape, CPU) exercises every stage but the GPU.


def test_gpu_check_dry_run(tmp_path):
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run([str(root / "scripts" / "gpu_check.sh"), "--dry-run", "--workdir", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=85)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "get_available_providers()" in done.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    environment = result["environment"]
    assert "CPUExecutionProvider" in environment["available_providers"]
    if not environment["cuda_ep_runs"]:
        assert "NO CUDA EXECUTION PROVIDER" in done.stdout
    assert result["ok"] is True
    names = {name for name, *_ in CONFIGS}
    for mode in ("device", "host"):
        stage = result["stages"][mode]
        assert set(stage["runs"]) == names and stage["lossless"] is True
        for run in stage["runs"].values():
            assert run["tokens_per_second"] > 0
        sd = stage["runs"]["spac+SD (decayed)"]
        assert 0 < sd["acceptance_rate"] < 1  # the scripted draft: right with probability 0.7 per token
        assert set(stage["ratios"]) >= {"spac+SD (decayed) / static+SD", "spac+SD (spac-counter) / lru"}
    device = result["stages"]["device"]["runs"]["spac+SD (spac-counter)"]
    assert device["device_hits"] + device["device_fetches"] > 0  # the device tier was used
    assert result["stages"]["host"]["runs"]["lru"]["storage_bytes_read"] > 0  # and storage paging


def test_bench_package_imports_without_torch():
    """spac.bench serves the device side too (the GPU check runs where torch is not installed)."""
    import subprocess

    code = ("import spac.bench.measure, spac.bench.prompts, spac.bench.replay, spac.bench.trace, sys; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
