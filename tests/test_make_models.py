"""Tests for scripts/make_models.py: tiny random models that load and run like a user's models."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import make_models  # noqa: E402
from make_models import DRAFT_FAMILIES, FAMILIES, build_tokenizer, make_model, make_pair, moe_block  # noqa: E402

TEXT = "def f(x):\n    return {'a': x ** 2}  # héllo, wörld 😀\n<|im_start|>user\nhi<|im_end|>\n"
PROMPT = "import os\nfor name in sorted(os.listdir('.')):\n    print(name, len(name))\n"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Builds each family once per module, on first use."""
    root = tmp_path_factory.mktemp("models")
    built = {}

    def get(family):
        if family not in built:
            built[family] = make_model(family, root / family)
        return built[family]

    return get


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def top_k_ids(router_output, k: int) -> torch.Tensor:
    if len(router_output) == 3:  # (logits, weights, ids)
        return router_output[2]
    return router_output[1].topk(k, dim=-1).indices  # Llama 4: (scores, logits)


def selected_experts(model, input_ids):
    """{router module name: top-k expert ids [tokens, k]} from one forward pass."""
    selected, k = {}, model.config.num_experts_per_tok
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: selected.__setitem__(name, top_k_ids(out, k)))
        for name, module in model.named_modules()
        # every family's router ("...Router", Hunyuan's "...Gate") returns (logits, weights, ids)
        if type(module).__name__.lower().endswith(("router", "gate"))
    ]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    return selected


def test_tokenizer_loads_in_both_libraries_and_round_trips(tmp_path):
    build_tokenizer(tmp_path)
    fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)

    ids = fast.encode(TEXT).ids
    assert auto(TEXT).input_ids == ids
    assert fast.decode(ids, skip_special_tokens=False) == TEXT
    assert auto.decode(ids) == TEXT
    assert fast.get_vocab_size() == len(auto) == 512
    for token in make_models.SPECIAL_TOKENS:
        assert len(fast.encode(token).ids) == 1
    assert auto.eos_token == "<|endoftext|>" and auto.pad_token_id != auto.eos_token_id

    # The chat template lives in tokenizer_config.json, where a runtime without transformers reads it.
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    chat = auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", FAMILIES + DRAFT_FAMILIES)
def test_model_reloads_and_generates(family, model_dirs):
    model, tokenizer = load(model_dirs(family))
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_is_varied(family, model_dirs):
    model, tokenizer = load(model_dirs(family))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[:, :16]
    assert ids.shape[1] == 16
    selected = selected_experts(model, ids)
    moe_layers = [layer for layer in model.model.layers if hasattr(moe_block(layer), "experts")]
    assert len(selected) == len(moe_layers)
    for name, experts in selected.items():
        assert experts.shape == (16, model.config.num_experts_per_tok)
        assert len(set(experts.flatten().tolist())) >= 4, f"{name} routes every token alike"


def test_family_specific_paths_are_exercised(model_dirs):
    deepseek, _ = load(model_dirs("deepseek_v3"))
    layers = deepseek.model.layers
    assert not hasattr(layers[0].mlp, "gate")  # first_k_dense_replace=1: layer 0 is dense
    assert deepseek.config.q_lora_rank and deepseek.config.n_group == 2 and deepseek.config.topk_group == 1
    for layer in layers[1:]:
        assert layer.mlp.gate.e_score_correction_bias.abs().min() > 0  # saved and reloaded
        assert hasattr(layer.mlp, "shared_experts")

    gpt_oss, _ = load(model_dirs("gpt_oss"))
    assert set(gpt_oss.config.layer_types) == {"sliding_attention", "full_attention"}
    assert gpt_oss.config.sliding_window < 24
    layer = gpt_oss.model.layers[0]
    for tensor in (layer.self_attn.sinks, layer.mlp.router.bias, layer.mlp.experts.gate_up_proj_bias,
                   layer.mlp.experts.down_proj_bias, layer.self_attn.q_proj.bias):
        assert tensor.abs().min() > 0

    qwen2_moe, _ = load(model_dirs("qwen2_moe"))
    assert qwen2_moe.model.layers[0].mlp.shared_expert_gate.weight.std() > 0.1


def test_overrides_apply_to_the_config(tmp_path):
    out = make_model("qwen3_moe", tmp_path, hidden_size=128, num_experts=16, moe_intermediate_size=48,
                     num_experts_per_tok=4, num_hidden_layers=1)
    model, tokenizer = load(out)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (16, 2 * 48, 128)
    assert model.config.num_experts_per_tok == 4 and model.config.num_hidden_layers == 1
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[:, :16]
    (experts_used,) = selected_experts(model, ids).values()
    assert experts_used.shape == (16, 4)


def test_cli_is_deterministic_across_processes(tmp_path, model_dirs):
    cmd = [sys.executable, str(SCRIPTS / "make_models.py"), "--family", "olmoe", "--out", str(tmp_path / "m"),
           "--draft-family", "llama", "--draft-out", str(tmp_path / "d")]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "olmoe: wrote" in result.stdout and "llama: wrote" in result.stdout
    for cli_dir, family in ((tmp_path / "m", "olmoe"), (tmp_path / "d", "llama")):
        for name in ("tokenizer.json", "model.safetensors", "config.json"):
            assert (cli_dir / name).read_bytes() == (model_dirs(family) / name).read_bytes(), name


def test_make_pair_builds_once_and_shares_the_tokenizer(tmp_path, monkeypatch):
    model_dir, draft_dir = make_pair("mixtral", tmp_path, draft_family="qwen2")
    assert (model_dir / "tokenizer.json").read_bytes() == (draft_dir / "tokenizer.json").read_bytes()
    assert AutoModelForCausalLM.from_pretrained(draft_dir).config.model_type == "qwen2"
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.parent.name]  # no temporary dirs left

    def fail(*args, **kwargs):
        raise AssertionError("a complete build must be reused")

    with monkeypatch.context() as patch:
        patch.setattr(make_models, "make_model", fail)
        assert make_pair("mixtral", tmp_path, draft_family="qwen2") == (model_dir, draft_dir)

    # A marker from another recipe (an older make_models.py) makes the pair rebuild.
    (model_dir.parent / ".complete").write_text("stale")
    (model_dir / "config.json").unlink()
    assert make_pair("mixtral", tmp_path, draft_family="qwen2") == (model_dir, draft_dir)
    assert (model_dir / "config.json").is_file()


@pytest.mark.slow
def test_scale_model(tmp_path):
    """The size the benchmarks use: 2 layers of 128 experts at hidden 2048 (4.6 GB, about a minute)."""
    out = make_model("qwen3_moe", tmp_path, hidden_size=2048, num_experts=128, moe_intermediate_size=768,
                     num_experts_per_tok=8, num_hidden_layers=2)
    # transformers 5 fuses experts in memory but saves the Hub's per-expert tensors.
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.127.gate_proj.weight").get_shape() == [768, 2048]
    config = json.loads((out / "config.json").read_text())
    # transformers 5 writes Qwen3-MoE's num_experts under its attribute_map name.
    assert config["num_local_experts"] == 128 and config["num_experts_per_tok"] == 8
