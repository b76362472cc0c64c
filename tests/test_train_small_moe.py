"""Tests for scripts/train_small_moe.py in its --quick mode: the pipeline runs end to end, the
models reload like a user's, the report is complete and sane, and training is deterministic."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_small_moe.py"
MODELS = ("small-moe", "small-draft")

pytestmark = pytest.mark.timeout(600)  # two quick runs; a busy 2-core machine is slow


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two quick runs with the same seed, into separate folders."""
    root = tmp_path_factory.mktemp("trained")
    for name in ("a", "b"):
        train(root / name, "--seed", "3")
    return root / "a", root / "b"


def test_models_reload_and_run(runs):
    out, _ = runs
    tokenizer = AutoTokenizer.from_pretrained(out / "small-moe")
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(out / name)
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    moe = AutoModelForCausalLM.from_pretrained(out / "small-moe")
    assert moe.config.model_type == "qwen3_moe" and moe.config.num_experts == 16


def test_report_is_complete_and_sane(runs):
    out, _ = runs
    report = json.loads((out / "train_report.json").read_text())
    vocab = report["vocab_size"]
    for name in ("moe", "draft"):
        ppl = report[name]["heldout_perplexity"]
        assert math.isfinite(ppl) and 1 < ppl < vocab
    routing = report["routing"]
    assert routing["max_entropy_bits"] == 4.0
    assert len(routing["entropy_bits"]) == report["recipe"]["layers"]
    assert all(0 <= h <= routing["max_entropy_bits"] for h in routing["entropy_bits"])
    assert all(0 <= o <= 1 for o in routing["overlap"] + routing["chance_overlap"])
    spec = report["speculative"]
    assert spec["gamma"] == 4 and 0 <= spec["acceptance_rate"] <= 1
    assert spec["mean_accepted_per_round"] == pytest.approx(4 * spec["acceptance_rate"], abs=1e-3)
    assert 0 <= report["draft"]["top1_agreement_with_moe"] <= 1
    assert report["train_wall_time_s"] > 0


def test_same_seed_gives_identical_weights(runs):
    a, b = runs
    for name in MODELS:
        wa, wb = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    tokenizers = [(out / "small-moe" / "tokenizer.json").read_bytes() for out in (a, b)]
    assert tokenizers[0] == tokenizers[1]


def test_matching_arguments_reuse_the_cache(runs):
    out, _ = runs
    before = (out / "small-moe" / "model.safetensors").stat().st_mtime_ns
    result = train(out, "--seed", "3")
    assert "up to date" in result.stderr
    assert (out / "small-moe" / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads(result.stdout) == json.loads((out / "train_report.json").read_text())


def test_demo_preset_sets_defaults_that_flags_override():
    import train_small_moe as script

    full, demo = script.parse_args([]), script.parse_args(["--preset", "demo"])
    assert demo.out != full.out  # a demo run never replaces the full run's models
    assert demo.moe_steps < full.moe_steps
    assert script.parse_args(["--preset", "demo", "--moe-steps", "5"]).moe_steps == 5
    # The preset is only a name: spelling its values out is the same recipe, so the cache matches.
    spelled = script.parse_args([f"--{name.replace('_', '-')}={value}"
                                 for name, value in script.PRESETS["demo"].items()])
    assert script.recipe(spelled) == script.recipe(demo) != script.recipe(full)
