"""Tests for the family descriptions (spac.export.families): table entries agree with what the
exporter recognises from a model's own modules, a family outside the table is recognised from its
parts, and a family with an unknown part is refused in one line that names the part.

The exports themselves (parity and lossless decoding of every family in make_models.FAMILIES)
are in test_export.py and test_runtime.py; these tests build configs and meta-device models only.
"""

from __future__ import annotations

import pytest
import torch
from make_models import MOE_CONFIGS
from transformers import AutoConfig

from spac.export import cli
from spac.export.attention import RealComplex, apply_rotary_emb
from spac.export.families import FAMILIES, ExportError, Family, family_for, recognise

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
             num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def config(model_type: str, **fields):
    return AutoConfig.for_model(model_type, **{**SMALL, **fields})


# Families the table describes by hand that recognition finds the same. (Mixtral, Qwen3-MoE and
# Qwen2-MoE configs window every layer by config.sliding_window, which recognition refuses to
# guess; GPT-OSS's interleaved experts are a table-only layout.)
RECOGNISABLE = ("olmoe", "flex_olmo", "deepseek_v2", "deepseek_v3", "dots1", "hunyuan_v1_moe")


@pytest.mark.parametrize("model_type", RECOGNISABLE)
def test_table_entries_are_what_recognition_finds(model_type):
    family, unknown = recognise(config(model_type, **MOE_CONFIGS[model_type]))
    assert unknown is None
    assert family == FAMILIES[model_type]


@pytest.mark.parametrize("model_type, router", [("glm4_moe", "gate"), ("ernie4_5_moe", "gate"),
                                                ("phimoe", "router")])
def test_family_outside_the_table_is_recognised_from_its_parts(model_type, router):
    assert model_type not in FAMILIES
    family = family_for(config(model_type), draft=False)
    assert family == Family(model_type, router=router)


# model_type -> fragments its one-line refusal names
REFUSED = {
    "qwen3_5_moe": ["layer 0 is a 'linear_attention' layer", "recurrent state", "roll back on rejection"],
    "qwen3_next": ["'linear_attention' layer", "recurrent state"],
    "minimax": ["layer 1 is a 'linear_attention' layer", "recurrent state"],
    "jamba": ["'linear_attention' layer", "recurrent state"],
    "granitemoehybrid": ["'linear_attention' layer", "recurrent state"],
    "llama4_text": ["num_experts_per_tok 2", "scales each expert's input", "valid: 1"],
    "deepseek_v32": ["layer 0 is a 'indexed_attention' layer", "supported layer types: full_attention"],
    "granitemoe": ["GraniteMoeDecoderLayer", "block_sparse_moe"],
}


@pytest.mark.parametrize("model_type", REFUSED)
def test_unsupported_part_is_refused_in_one_line_naming_it(model_type):
    with pytest.raises(ExportError) as error:
        family_for(config(model_type, pad_token_id=None), draft=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"unsupported architecture {model_type!r} for the target")
    assert "supported: mixtral, qwen2_moe" in message
    for fragment in REFUSED[model_type]:
        assert fragment in message, message


def test_unknown_router_and_expert_layout_are_named(monkeypatch):
    from transformers.models.olmoe import modeling_olmoe

    def two_outputs(self, hidden_states):
        return hidden_states, hidden_states

    with monkeypatch.context() as patch:  # a router of another interface: the fault injected
        patch.setattr(modeling_olmoe.OlmoeTopKRouter, "forward", two_outputs)
        assert "unknown router OlmoeTopKRouter" in recognise(config("olmoe"))[1]
    _, unknown = recognise(config("olmoe", hidden_act="gelu"))
    assert "unknown routed-expert layout OlmoeExperts" in unknown and "activation GELU" in unknown


def test_post_norm_layer_with_shared_experts_is_refused(monkeypatch):
    from transformers.models.flex_olmo import modeling_flex_olmo

    block = modeling_flex_olmo.FlexOlmoSparseMoeBlock
    original = block.__init__

    def with_shared_expert(self, config):
        original(self, config)
        self.shared_expert = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    monkeypatch.setattr(block, "__init__", with_shared_expert)  # the fault injected
    family, unknown = recognise(config("flex_olmo"))
    assert family is None and "shared experts in a post-norm layer" in unknown


def test_cli_refuses_a_linear_attention_model_before_loading_it(tmp_path, capsys, monkeypatch):
    from spac.export import package

    def load_model(*args):
        raise AssertionError("a model was loaded before the family was checked")

    monkeypatch.setattr(package, "load_model", load_model)
    model = tmp_path / "qwen3-next"
    config("qwen3_next", architectures=["Qwen3NextForCausalLM"]).save_pretrained(model)
    draft = tmp_path / "draft"
    config("qwen3", architectures=["Qwen3ForCausalLM"]).save_pretrained(draft)
    code = cli.main([str(model), "--draft", str(draft), "-o", str(tmp_path / "pkg"), "--quiet"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1
    assert "'qwen3_next'" in errors[0] and "'linear_attention' layer" in errors[0]
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("model_type, heads_axis", [("deepseek_v2", 1), ("llama4", 2)])
def test_real_rotary_equals_transformers_complex_rotary(model_type, heads_axis):
    """DeepSeek-V2 rotates queries [B, H, T, D], Llama 4 [B, T, H, D]; the embedding is [B, T, D/2]."""
    import importlib

    complex_rotary = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}").apply_rotary_emb
    gen = torch.Generator().manual_seed(0)
    shape = [1, 5, 8]
    q, k = torch.randn(*shape[:heads_axis], 4, *shape[heads_axis:], generator=gen), \
        torch.randn(*shape[:heads_axis], 2, *shape[heads_axis:], generator=gen)
    freqs = torch.polar(torch.ones(1, 5, 4), torch.randn(1, 5, 4, generator=gen)) * 1.3
    theirs = complex_rotary(q, k, freqs)
    ours = apply_rotary_emb(q, k, RealComplex(freqs.real, freqs.imag, heads_axis))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
