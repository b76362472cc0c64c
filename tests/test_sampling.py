"""The sampler's options against transformers' own logits processors, its defaults from the
model's generation_config.json, and the exporter carrying those defaults into the package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from spac.export.package import generation_defaults
from spac.runtime import Runtime
from spac.runtime.speculative import Sampler

VOCAB = 40
CASES = [  # temperature, top_k, top_p, min_p, repetition_penalty
    (1.0, 0, 1.0, 0.0, 1.0), (0.7, 10, 1.0, 0.0, 1.0), (1.3, 0, 0.8, 0.0, 1.0), (1.0, 0, 1.0, 0.05, 1.0),
    (0.9, 12, 0.9, 0.02, 1.3), (1.0, 0, 1.0, 0.0, 0.8), (0.6, 20, 0.95, 0.0, 1.1),
]


def transformers_probs(logits, context, temperature, top_k, top_p, min_p, repetition_penalty) -> np.ndarray:
    """transformers' sampling pipeline, in the order generate() builds it."""
    ids, scores = torch.tensor([context]), torch.tensor(logits[None], dtype=torch.float64)
    processors = [RepetitionPenaltyLogitsProcessor(repetition_penalty), TemperatureLogitsWarper(temperature)]
    processors += [TopKLogitsWarper(top_k)] if top_k else []
    processors += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    processors += [MinPLogitsWarper(min_p)] if min_p else []
    for processor in processors:
        scores = processor(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, repetition_penalty", CASES)
def test_probs_match_transformers(temperature, top_k, top_p, min_p, repetition_penalty):
    rng = np.random.default_rng(3)
    sampler = Sampler(temperature, top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty)
    for _ in range(30):
        logits = rng.normal(scale=2.0, size=VOCAB)
        context = rng.integers(0, VOCAB, size=12).tolist()
        got = sampler.probs(logits, context, prompt_length=len(context))
        want = transformers_probs(logits, context, temperature, top_k, top_p, min_p, repetition_penalty)
        np.testing.assert_allclose(got, want, atol=1e-9)


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = np.linspace(-1.0, 1.0, VOCAB)
    prompt, generated = [1, 1, 2], [3, 3, 3, 4]
    sampler = Sampler(1.0, frequency_penalty=0.5, presence_penalty=0.25)
    want = logits.copy()
    want[3] -= 0.5 * 3 + 0.25
    want[4] -= 0.5 * 1 + 0.25
    np.testing.assert_allclose(sampler.penalize(logits, prompt + generated, len(prompt)), want)
    expected = np.exp(want - want.max())
    np.testing.assert_allclose(sampler.probs(logits, prompt + generated, len(prompt)), expected / expected.sum())


def test_greedy_picks_the_penalized_argmax():
    logits = np.zeros(VOCAB)
    logits[7], logits[8] = 2.0, 1.8
    assert Sampler().pick(logits, [7], 0) == 7
    assert Sampler(repetition_penalty=1.2).pick(logits, [7], 0) == 8  # 2.0 / 1.2 < 1.8
    assert Sampler(presence_penalty=0.5).pick(logits, [5, 7], 1) == 8
    assert Sampler(presence_penalty=0.5).pick(logits, [7], 1) == 7  # prompt tokens carry no presence penalty


def test_defaults_come_from_the_generation_config():
    qwen3 = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    sampler = Sampler.from_options(qwen3)
    assert (sampler.temperature, sampler.top_p, sampler.top_k, sampler.min_p) == (0.6, 0.95, 20, 0.0)
    assert sampler.repetition_penalty == 1.05
    chosen = Sampler.from_options(qwen3, temperature=0.0, top_k=None, presence_penalty=0.5)
    assert chosen.greedy and chosen.top_k == 20 and chosen.presence_penalty == 0.5
    # Without do_sample transformers ignores temperature & co. but still applies the repetition penalty.
    greedy = Sampler.from_options({"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1})
    assert greedy.greedy and greedy.top_k == 0 and greedy.repetition_penalty == 1.1
    assert Sampler.from_options({"do_sample": True}).temperature == 1.0
    assert Sampler.from_options({}).greedy
    with pytest.raises(ValueError, match="temperature='hot'"):
        Sampler.from_options({"do_sample": True, "temperature": "hot"})
    with pytest.raises(TypeError, match="unknown sampling option"):
        Sampler.from_options({}, typical_p=0.5)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        Sampler.from_options({}, top_k=-2)


def test_exporter_carries_the_generation_config(tmp_path, exported):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": None, "eos_token_id": 2, "max_length": 9}))
    assert generation_defaults(tmp_path) == {"do_sample": True, "temperature": 0.7, "top_k": 20}
    assert generation_defaults(tmp_path / "none") == {}
    package = exported("qwen3_moe")
    assert package.manifest["tokenizer"]["generation"] == {"do_sample": False}


def test_runtime_uses_the_package_defaults(exported):
    with Runtime(exported("qwen3_moe").output, profile="cpu-only", draft_len=3) as runtime:
        greedy = runtime.generate("def f(x):", max_new_tokens=12)
        runtime.manifest.tokenizer["generation"] = {"do_sample": True, "temperature": 1.5, "top_k": 30}
        sampled = runtime.generate("def f(x):", max_new_tokens=12, seed=4)
        explicit = runtime.generate("def f(x):", max_new_tokens=12, seed=4, temperature=1.5, top_k=30)
        assert sampled.token_ids == explicit.token_ids != greedy.token_ids
        assert runtime.generate("def f(x):", max_new_tokens=12, temperature=0).token_ids == greedy.token_ids
