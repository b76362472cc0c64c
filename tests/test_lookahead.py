"""Lookahead beyond the current layer (spac.ops.lookahead): guesses come from the layers' own
routers, are scored against the real routing, and never change what is computed."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from spac.ops.lookahead import Lookahead, RouterWeights, load_routers
from spac.runtime import Runtime
from spac.runtime.manifest import load_manifest
from spac.runtime.tokenizer import TextTokenizer

PROMPT = "def fibonacci(n):\n    "


def test_guess_is_the_routers_top_k_by_votes_within_the_budget():
    router = np.eye(4, dtype=np.float32)  # expert e scores hidden[e]
    look = Lookahead({3: RouterWeights(np.ones(4, np.float32), router)}, top_k=2, budgets=(2, 1))
    hidden = np.array([[5, 4, 0, 0], [5, 0, 4, 0], [5, 4, 0, 0]], np.float32)
    assert [e for e, _ in look.guess(3, hidden, 0)] == [0, 1]  # 3 votes, 2 votes; expert 2 has 1
    assert look.guess(3, hidden, 1) == [(0, 0.5)]
    assert look.guess(7, hidden, 0) == []  # a layer without a known router is never guessed
    assert look.score(3, {0, 2}) == {0, 1}
    stats = look.as_dict()
    assert stats["distance_0"] == {"guessed": 2, "precision": 0.5, "recall": 0.5}
    assert stats["distance_1"] == {"guessed": 1, "precision": 1.0, "recall": 0.5}


def test_routers_are_read_from_every_moe_layer_graph(exported):
    manifest = load_manifest(exported("qwen3_moe").output)
    routers = load_routers(manifest)
    assert sorted(routers) == manifest.target.moe_layers
    hidden, experts = manifest.target.dims["hidden_size"], manifest.target.dims["num_experts"]
    assert all(r.router.shape == (experts, hidden) and r.norm.shape == (hidden,) for r in routers.values())


def test_lookahead_is_lossless_and_reports_its_guesses(exported, model_pair):
    package = exported("qwen3_moe").output
    ids = TextTokenizer(load_manifest(package)).encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(model_pair("qwen3_moe")[0])
    inputs = torch.tensor([ids])
    expected = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=16,
                              do_sample=False)[0, len(ids):].tolist()
    with Runtime(package, draft_len=4, policy="spac", host_budget=0.25, layer_lookahead=True) as runtime:
        result = runtime.generate(PROMPT, max_new_tokens=16)
        stats = runtime.experts.layer_lookahead.as_dict()
    assert result.token_ids == expected
    assert stats["distance_0"]["guessed"] > 0 and stats["distance_1"]["guessed"] > 0
    assert 0 <= stats["distance_0"]["precision"] <= 1 and stats["read_early"] >= 0
