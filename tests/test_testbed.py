"""The memory testbed (spac.export.testbed, scripts/make_testbed.py): widened experts are bigger
and cost more, yet greedy tokens stay the original model's under transformers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from spac.export.testbed import WideningError, widen_experts

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PROMPTS = ([1, 5, 9, 200, 31, 7], [3, 100, 101, 102], [42] * 5)


def greedy(model_dir, prompt, new_tokens=24):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def expert_tensors(model_dir):
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    return {name: tensor for name, tensor in state.items() if ".experts." in name}, state


def test_widened_model_keeps_tokens_and_grows_experts(model_pair, tmp_path):
    model_dir, _ = model_pair("qwen3_moe")
    widened = widen_experts(model_dir, tmp_path / "wide", width=96)
    wide = widened.path
    for prompt in PROMPTS:
        assert greedy(wide, prompt) == greedy(model_dir, prompt)
    (old_experts, old), (new_experts, new) = expert_tensors(model_dir), expert_tensors(wide)
    assert {n: t for n, t in new.items() if n not in new_experts}.keys() == {
        n for n in old if n not in old_experts}
    for name, tensor in new_experts.items():
        before = old_experts[name]
        if name.endswith("down_proj"):
            intermediate = before.shape[2]
            assert tensor.shape[2] == 96 and torch.equal(tensor[..., :intermediate], before)
            assert not tensor[..., intermediate:].any()  # the new neurons contribute nothing
        else:
            half = before.shape[1] // 2
            assert tensor.shape[1] == 2 * 96
            assert torch.equal(tensor[:, :half], before[:, :half]) and torch.equal(tensor[:, 96:96 + half], before[:, half:])
            assert tensor[:, half:96].abs().min() > 0  # new gate rows are real work, not zeros
    assert (wide / "tokenizer.json").is_file()
    first = next(n for n in new_experts if n.endswith("gate_up_proj"))
    assert widened.expert_bytes == 3 * 96 * new_experts[first].shape[2] * 4  # fp32 gate, up and down
    assert widened.experts == sum(t.shape[0] for n, t in new_experts.items() if n.endswith("gate_up_proj"))


def test_refuses_a_model_without_fused_experts(model_pair, tmp_path):
    _, draft_dir = model_pair("qwen3_moe")
    with pytest.raises(WideningError, match="gate_up_proj"):
        widen_experts(draft_dir, tmp_path / "wide", width=4096)
    assert not (tmp_path / "wide").exists()


def test_script_says_one_line_when_the_trained_folder_is_missing(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "make_testbed.py"), "--trained", str(tmp_path / "none"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "small-moe" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trained_testbed_generates_the_trained_models_tokens(tmp_path):
    """On a --quick trained model (real routing), through the script."""
    subprocess.run([sys.executable, str(SCRIPTS / "train_small_moe.py"), "--quick", "--out", str(tmp_path / "t")],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(SCRIPTS / "make_testbed.py"), "--trained", str(tmp_path / "t"),
                    "--out", str(tmp_path / "bed"), "--width", "2048"], check=True, capture_output=True)
    for prompt in PROMPTS:
        assert greedy(tmp_path / "bed" / "small-moe", prompt, 32) == greedy(tmp_path / "t" / "small-moe", prompt, 32)
    assert (tmp_path / "bed" / "small-draft" / "config.json").is_file()
