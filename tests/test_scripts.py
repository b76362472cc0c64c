"""Every script under scripts/ in its smallest mode, run as a new user would: from a fresh
`git clone` of this repository (so only committed files count, and no folder that an earlier run
made is there), each script writing its defaults (cache/, results/) inside the clone.

The default suite runs the scripts that need no export; the rest are marked slow. Not here:
scripts/gpu_check.py (tests/test_bench.py runs its --dry-run) and scripts/export_scale_check.py
(a Qwen3-30B-A3B-shaped layer is gigabytes even at its smallest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import memory_cap
import pytest

from test_bench import synthetic_trace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """(the clone, the environment that makes `import spac` resolve to it)."""
    root = tmp_path_factory.mktemp("fresh")
    subprocess.run(["git", "clone", "-q", str(REPO), str(root / "moe-spac")], check=True)
    (root / "path").mkdir()
    (root / "path" / "spac").symlink_to(root / "moe-spac")  # the repository root is the package
    env = {**os.environ, "PYTHONPATH": str(root / "path"), "PYTHONUNBUFFERED": "1"}
    return root / "moe-spac", env


def run_script(clone, *args, timeout=600) -> subprocess.CompletedProcess:
    folder, env = clone
    done = subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_make_models(clone):
    run_script(clone, "scripts/make_models.py", "--family", "qwen3_moe", "--out", "cache/models/moe",
               "--draft-family", "qwen3", "--draft-out", "cache/models/draft")
    assert (clone[0] / "cache" / "models" / "moe" / "config.json").is_file()


def test_bench_balancer(clone):
    run_script(clone, "scripts/bench_balancer.py", "--rounds", "2", "--warmup-rounds", "1", "--layers", "4",
               "--experts", "16", "--oracle-limit-ms", "200")
    result = json.loads((clone[0] / "results" / "bench_balancer.json").read_text())
    assert result


def test_bench_replay_only(clone, tmp_path):
    traces = {"sd": synthetic_trace(True), "no-sd": synthetic_trace(False), "calibration": synthetic_trace(True, 1)}
    for trace in traces.values():  # the model sizes a recorded trace carries, for --replay-scale package
        trace["model"].update(bytes_per_expert=1_000_000, trunk_bytes=10_000_000, draft_bytes=2_000_000)
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(traces))
    run_script(clone, "scripts/bench.py", "--traces", str(path), "--replay", "cpu-only", "--budgets", "25,100",
               "--out-dir", "results/replay-only")
    result = json.loads((clone[0] / "results" / "replay-only" / "replay.json").read_text())
    assert result["replay"]["note"] == "MODELLED, not measured"


@pytest.mark.slow
def test_bench_op_overhead(clone):
    run_script(clone, "scripts/bench_op_overhead.py", "--calls", "20")
    assert json.loads((clone[0] / "results" / "bench_op_overhead.json").read_text())["pager_hit_us"] > 0


@pytest.mark.slow
def test_paging_benchmarks(clone):
    """bench_paging first (it builds and exports the random-weight fallback into cache/packages/),
    then bench.py --quick, bench_chat and bench_server on that package."""
    run_script(clone, "scripts/bench_paging.py", "--max-new-tokens", "4")
    assert json.loads((clone[0] / "results" / "bench_paging.json").read_text())["lossless"] is True
    run_script(clone, "scripts/bench.py", "--quick", "--max-new-tokens", "4", "--budgets", "17,100",
               "--replay", "cpu-only")
    assert (clone[0] / "results" / "bench" / "results.json").is_file()
    package = "cache/packages/random-small-moe/package"
    run_script(clone, "scripts/bench_chat.py", "--package", package, "--repeats", "1", "--reply-tokens", "4")
    run_script(clone, "scripts/bench_server.py", "--package", package, "--repeats", "1", "--tokens", "4")


@pytest.mark.slow
def test_bench_runtime_quick(clone):
    run_script(clone, "scripts/bench_runtime.py", "--quick")
    assert json.loads((clone[0] / "results" / "bench_runtime.json").read_text())["runtime_tokens_per_second"] > 0


@pytest.mark.slow
def test_bench_kv_cache_smallest(clone):
    run_script(clone, "scripts/bench_kv_cache.py", "--contexts", "16", "--tokens", "4", "--repeats", "1",
               "--precisions", "float32")
    result = json.loads((clone[0] / "results" / "bench_kv_cache.json").read_text())["results"]["float32 @ 16"]
    assert result["median_tokens_per_second"]["in place"] > 0 and result["median_tokens_per_second"]["copying"] > 0


@pytest.mark.slow
def test_train_then_bench_paging(clone):
    """The path a new user takes: train the small model, then benchmark paging and self-speculative
    decoding on it."""
    run_script(clone, "scripts/train_small_moe.py", "--quick")
    done = run_script(clone, "scripts/bench_paging.py", "--max-new-tokens", "4")
    assert "trained on the standard library" in done.stdout
    run_script(clone, "scripts/bench_self_speculative.py", "--budgets", "0.25", "--repeats", "1",
               "--max-new-tokens", "4")
    result = json.loads((clone[0] / "results" / "bench_self_speculative.json").read_text())
    runs = set(result["budgets"]["25%"]["runs"])
    assert result["lossless"] and runs >= {"no SD (lru)", "draft SD", "self SD", "self SD (copies)"}
    if memory_cap.available() is None:  # a cap far too small: the first run is killed inside it, one line says so
        folder, env = clone
        done = subprocess.run([sys.executable, "scripts/bench_self_speculative.py", "--budgets", "0.25", "--repeats",
                               "1", "--max-new-tokens", "4", "--memory-cap", "0.001"], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "failed inside the" in done.stderr and "give a larger --memory-cap" in done.stderr


@pytest.mark.slow
def test_demo(clone):
    run_script(clone, "scripts/demo.py", "--max-new-tokens", "8", "--work", "cache/demo-test")
