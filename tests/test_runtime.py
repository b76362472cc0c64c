"""Tests for spac.runtime: lossless speculative decoding against transformers, the rejection
sampler's output distribution, the Python API, bad input and Ctrl-C.

Packages come from the session fixture `exported(family)` (one export per family, shared with
other test files); each family's Runtime is loaded once per module.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import make_models  # tests/conftest.py puts scripts/ on sys.path
from spac.runtime import GenerationError, ManifestError, Runtime
from spac.runtime.chat import chat_prompt
from spac.runtime.model import ModelRunner
from spac.ops.sessions import cuda_available
from spac.runtime.profile import ProfileError, load_profile
from spac.runtime.speculative import Decoder, Sampler

FAMILIES = make_models.FAMILIES
API_FAMILY = "qwen3_moe"  # the family the API and bad-input tests use
NEW_TOKENS = 32
# Candidates for the lossless tests: the first one whose transformers continuation runs the full
# NEW_TOKENS without an end-of-sequence token is used, so every family compares 32 tokens.
PROMPTS = ("def fibonacci(n):\n    ", "import os\nfor name in sorted(", "class Queue:\n    def put(self, item):")


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def runtime_for(exported):
    """runtime_for(family) -> a Runtime (cpu-only, draft_len 4) on the family's package, loaded once."""
    runtimes = {}

    def get(family):
        if family not in runtimes:
            runtimes[family] = Runtime(exported(family).output, profile="cpu-only", draft_len=4)
        return runtimes[family]

    yield get
    for runtime in runtimes.values():
        runtime.close()


@pytest.fixture(scope="module")
def hf_greedy(model_pair):
    """hf_greedy(family, ids, n, **generate_kwargs) -> the new token ids of transformers' greedy
    generate() on the family's original model."""
    import torch
    from transformers import AutoModelForCausalLM

    models, results = {}, {}

    def get(family, ids, n=NEW_TOKENS, **kwargs):
        key = (family, tuple(ids), n, tuple(sorted(kwargs.items())))
        if key not in results:
            if family not in models:
                models[family] = AutoModelForCausalLM.from_pretrained(model_pair(family)[0]).eval()
            with torch.no_grad():
                inputs = torch.tensor([ids])
                out = models[family].generate(inputs, attention_mask=torch.ones_like(inputs),
                                              max_new_tokens=n, do_sample=False, **kwargs)
            results[key] = out[0, len(ids):].tolist()
        return results[key]

    return get


@pytest.fixture(scope="module")
def reference(runtime_for, hf_greedy):
    """reference(family) -> (prompt ids, transformers' greedy continuation of NEW_TOKENS tokens)."""

    def get(family):
        runtime = runtime_for(family)
        for prompt in PROMPTS:
            ids = runtime.tokenizer.encode(prompt)
            expected = hf_greedy(family, ids)
            if len(expected) == NEW_TOKENS and not set(expected) & runtime.tokenizer.eos_token_ids:
                return ids, expected
        pytest.fail(f"{family}: every candidate prompt hits end-of-sequence within {NEW_TOKENS} tokens; "
                    "add a prompt to PROMPTS")

    return get


@pytest.fixture
def package_copy(exported, tmp_path):
    """A private copy of the API family's package, free to corrupt."""
    return Path(shutil.copytree(exported(API_FAMILY).output, tmp_path / "package"))


# ---------------------------------------------------------------------------------------------
# Lossless greedy decoding, every family


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(family, runtime_for, reference):
    runtime = runtime_for(family)
    ids, expected = reference(family)
    eos = runtime.tokenizer.eos_token_ids

    plain = runtime.generate(ids, max_new_tokens=NEW_TOKENS, speculative=False)
    assert plain.token_ids == expected
    assert plain.stats.decode.rounds == 0 and plain.stats.draft_len == 0

    for draft_len in (4, 1):
        runtime.draft_len = draft_len
        try:
            result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
        finally:
            runtime.draft_len = 4
        assert result.token_ids == expected, f"draft_len {draft_len}"
        assert result.text == runtime.tokenizer.decode(expected)
        assert result.stats.draft_len == draft_len and result.stats.decode.rounds > 0
        assert result.stats.decode.proposed <= draft_len * result.stats.decode.rounds
        # Both caches hold a prefix of the sequence: the target all but the last token.
        assert runtime.target.length == len(ids) + NEW_TOKENS - 1
        assert runtime.draft.length <= runtime.target.length
    assert not set(expected) & eos


def test_generation_stops_at_eos_like_transformers(runtime_for, reference, hf_greedy, monkeypatch):
    """transformers stops after the first end-of-sequence token; so must we, also when it comes in
    the middle of a speculative round. The tiny random models rarely emit their real EOS, so a
    token of the greedy continuation is declared EOS on both sides."""
    runtime = runtime_for(API_FAMILY)
    ids, expected = reference(API_FAMILY)
    # A token first seen at index 6..9: the second round of an always-right draft (γ=4) brings 6-10.
    index = next(i for i in range(6, 10) if expected[i] not in expected[:i])
    eos = expected[index]
    hf_ids = hf_greedy(API_FAMILY, ids, NEW_TOKENS, eos_token_id=eos)
    assert hf_ids == expected[:index + 1]
    monkeypatch.setattr(runtime.tokenizer, "eos_token_ids", frozenset({eos}))
    for speculative in (True, False):
        result = runtime.generate(ids, max_new_tokens=NEW_TOKENS, speculative=speculative)
        assert result.token_ids == hf_ids
        assert result.stats.new_tokens == len(hf_ids)
    # With an always-right draft (the target itself) the EOS lands inside a fully accepted round:
    # the tokens after it are dropped.
    twin = ModelRunner(runtime.manifest, runtime.manifest.target, runtime.sessions, runtime.experts)
    monkeypatch.setattr(runtime, "draft", twin)
    result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == hf_ids
    assert result.stats.decode.acceptance_rate == 1.0 and result.stats.decode.rounds == 2


def test_greedy_with_repetition_penalty_equals_transformers(runtime_for, reference, hf_greedy):
    runtime = runtime_for(API_FAMILY)
    ids, _ = reference(API_FAMILY)
    expected = hf_greedy(API_FAMILY, ids, NEW_TOKENS, repetition_penalty=1.5)
    for speculative in (True, False):
        result = runtime.generate(ids, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5, speculative=speculative)
        assert result.token_ids == expected


def test_chat_turns_reuse_the_cache_and_equal_transformers(runtime_for, hf_greedy):
    """Each turn prefills only what the caches lack; a conversation that departs from the cached
    one (an edited first message) keeps just the common prefix. Greedy output stays transformers'."""
    runtime = runtime_for(API_FAMILY)
    conversation = [{"role": "user", "content": PROMPTS[0]}]
    first = runtime.chat(conversation, max_new_tokens=12)
    first_ids = chat_prompt(runtime.tokenizer, conversation)
    conversation += [{"role": "assistant", "content": first.text}, {"role": "user", "content": PROMPTS[1]}]
    edited = [{"role": "user", "content": PROMPTS[2]}] + conversation[1:]
    reused = []
    for messages, speculative in ((conversation, True), (edited, True), (conversation, False)):
        ids = chat_prompt(runtime.tokenizer, messages)
        before = list(runtime.target.tokens)
        result = runtime.chat(messages, max_new_tokens=NEW_TOKENS, speculative=speculative)
        assert result.token_ids == hf_greedy(API_FAMILY, ids, NEW_TOKENS)
        shared = next(i for i, (a, b) in enumerate(zip(before + [-1], ids)) if a != b)
        assert result.stats.decode.reused == min(shared, len(ids) - 1)
        reused.append(shared)
        # Each cache holds a prefix of the sequence (the draft's, when it took part).
        for runner in (runtime.target, runtime.draft) if speculative else (runtime.target,):
            assert runner.tokens == (ids + result.token_ids)[:runner.length]
    # The second turn reused at least the first turn's prompt (the reply re-encodes to other tokens
    # with these random models); the edited one, only its start.
    assert reused[0] >= len(first_ids) and reused[1] < len(first_ids)


def run_decoder(decoder: Decoder, prompt: list[int], count: int, draft_len: int) -> list[int]:
    """Generate `count` tokens the way Runtime does (no round proposes past the limit)."""
    tokens = [decoder.prefill(prompt)]
    while len(tokens) < count:
        tokens += decoder.step(min(draft_len, count - len(tokens) - 1))
    return tokens


class NegatedRunner(ModelRunner):
    """The target with negated logits: as a greedy draft it proposes the least likely token."""

    def forward(self, tokens):
        return -super().forward(tokens)


def assert_cache_rolled_back(runner: ModelRunner, fresh: ModelRunner, tokens: list[int]) -> None:
    """`runner`'s KV cache equals one computed from scratch on the prefix it claims to hold."""
    fresh.reset()
    fresh.forward(tokens[:runner.length])
    for (first, second), (want_first, want_second) in zip(runner.cache, fresh.cache):
        assert first.shape == want_first.shape and second.shape == want_second.shape
        np.testing.assert_allclose(first, want_first, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(second, want_second, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_always_right_and_always_wrong_drafts(family, runtime_for, reference):
    runtime = runtime_for(family)
    ids, expected = reference(family)
    manifest, target = runtime.manifest, runtime.target
    twin = ModelRunner(manifest, manifest.target, runtime.sessions, runtime.experts)

    # The target as its own draft: every proposal is accepted.
    right = Decoder(target, twin, Sampler())
    assert run_decoder(right, ids, NEW_TOKENS, 4) == expected
    assert right.stats.accepted == right.stats.proposed > 0
    assert right.stats.as_dict()["acceptance_rate"] == 1.0
    assert target.length == len(right.tokens) - 1
    assert twin.length <= len(right.tokens) - 1
    fresh = ModelRunner(manifest, manifest.target, runtime.sessions, runtime.experts)
    assert_cache_rolled_back(target, fresh, right.tokens)
    assert_cache_rolled_back(twin, fresh, right.tokens)

    # Negated target logits: every proposal is rejected, every round rolls both caches back.
    wrong_draft = NegatedRunner(manifest, manifest.target, runtime.sessions, runtime.experts)
    wrong = Decoder(target, wrong_draft, Sampler())
    assert run_decoder(wrong, ids, NEW_TOKENS, 4) == expected
    assert wrong.stats.accepted == 0 and wrong.stats.proposed > 0
    assert wrong.stats.as_dict()["acceptance_rate"] == 0.0
    # One token per round: the prefill brings the first, the last comes from a plain step.
    assert wrong.stats.rounds == NEW_TOKENS - 2
    assert target.length == len(wrong.tokens) - 1
    assert wrong_draft.length <= len(wrong.tokens) - 1
    assert_cache_rolled_back(target, fresh, wrong.tokens)
    assert_cache_rolled_back(wrong_draft, fresh, wrong.tokens)

    # Sampling with the target as its own draft: p and q agree up to float rounding (the
    # verifier computes γ+1 rows at once), so nearly everything is accepted and nothing breaks.
    sampled = Decoder(target, twin, Sampler(temperature=1.0, seed=0))
    tokens = run_decoder(sampled, ids, NEW_TOKENS, 4)
    assert len(tokens) == NEW_TOKENS
    assert sampled.stats.as_dict()["acceptance_rate"] > 0.9


def transformers_cache(model_dir: Path, tokens: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the keys and values transformers' own forward caches for `tokens`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        cache = model(torch.tensor([tokens]), use_cache=True).past_key_values
    return [(layer.keys.numpy(), layer.values.numpy()) for layer in cache.layers]


def test_fused_layers_append_to_their_cache_in_place(runtime_for, reference, model_pair, monkeypatch):
    """Layers whose attention is one GroupQueryAttention node write each step's keys and values
    into their cache's buffers (kv_cache.InPlaceCache): a step within the capacity allocates no
    new cache, growing past it keeps what was held, and after steps, growth, a rollback and a pass
    that failed midway the cache holds what transformers' does."""
    runtime = runtime_for(API_FAMILY)
    ids, _ = reference(API_FAMILY)
    target = ModelRunner(runtime.manifest, runtime.manifest.target, runtime.sessions, runtime.experts)
    assert target.in_place == set(range(len(target.layers)))
    tokens = ids + list(range(40, 60))
    target.forward(tokens[:len(ids)])
    buffers = [layer.buffers for layer in target.kv.layers]
    target.forward(tokens[len(ids):len(ids) + 1])
    assert target.kv.layers[0].capacity > target.length
    assert [layer.buffers for layer in target.kv.layers] == buffers  # the same arrays, written in place
    for token in tokens[target.length:]:  # past the first capacity (16 positions)
        target.forward([token])
    assert target.kv.layers[0].capacity >= 32
    target.truncate(len(ids) + 3)
    target.forward(tokens[target.length:target.length + 5])  # a verify-sized step after a rollback

    # A pass that fails in its last MoE layer leaves the cache as it was.
    last = max(layer.index for layer in runtime.manifest.target.layers if layer.kind == "moe")
    run = type(runtime.experts).run

    def failing(experts, layer, *args, **kwargs):
        if layer == last:
            raise RuntimeError("an expert failed")
        return run(experts, layer, *args, **kwargs)

    held = target.length
    with monkeypatch.context() as patch:
        patch.setattr(type(runtime.experts), "run", failing)
        with pytest.raises(RuntimeError, match="an expert failed"):
            target.forward(tokens[held:held + 2])
    assert target.length == held
    for (first, second), (want_first, want_second) in zip(target.cache, transformers_cache(model_pair(API_FAMILY)[0],
                                                                                          tokens[:held])):
        np.testing.assert_allclose(first, want_first, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(second, want_second, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampling: the output distribution is the target's


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, stat/2)
    (series below a+1, Lentz's continued fraction above; Numerical Recipes 6.2). scipy is not a
    dependency."""
    a, x = df / 2, stat / 2
    if x <= 0:
        return 1.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        n = a
        while abs(term) > abs(total) * 1e-15:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_prefactor) * h


def test_chi2_sf_matches_tables():
    # Critical values at p = 0.05 and 0.001 from standard chi-square tables.
    for stat, df, p in ((3.841, 1, 0.05), (9.488, 4, 0.05), (36.415, 24, 0.05), (124.342, 100, 0.05),
                        (18.467, 4, 0.001), (51.179, 24, 0.001)):
        assert chi2_sf(stat, df) == pytest.approx(p, rel=2e-3)
    assert chi2_sf(0.0, 3) == 1.0


VOCAB = 5


class TableRunner:
    """Test double for ModelRunner with a known output distribution: the logits after a prefix
    depend on its length (mod 3) and its last token, read from a fixed table [3, VOCAB, VOCAB].
    It keeps the same contract: forward feeds tokens after the cached ones, truncate rolls back."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self.sequence: list[int] = []
        self.calls = 0

    @property
    def length(self) -> int:
        return len(self.sequence)

    def reset(self) -> None:
        self.sequence = []

    def truncate(self, length: int) -> None:
        del self.sequence[length:]

    def logits_after(self, prefix) -> np.ndarray:
        return self.table[len(prefix) % len(self.table), prefix[-1]]

    def forward(self, tokens) -> np.ndarray:
        self.calls += 1
        rows = []
        for token in tokens:
            self.sequence.append(int(token))
            rows.append(self.logits_after(self.sequence))
        return np.array(rows, dtype=np.float32)


def reference_probs(logits: np.ndarray, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0,
                    penalties: dict | None = None, prefix=(), prompt_length: int = 0) -> np.ndarray:
    """Penalties, temperature, top-k, then nucleus and min-p filtering, written independently of
    Sampler.probs: penalize each token seen, keep the k most likely, keep the most likely tokens
    until their mass reaches top_p, drop those under min_p times the most likely."""
    z = np.array(logits, np.float64)
    penalties = penalties or {}
    for token in set(prefix):
        rp = penalties.get("repetition_penalty", 1.0)
        z[token] = z[token] / rp if z[token] > 0 else z[token] * rp
    for token in set(prefix[prompt_length:]):
        z[token] -= (penalties.get("frequency_penalty", 0.0) * list(prefix[prompt_length:]).count(token)
                     + penalties.get("presence_penalty", 0.0))
    z /= temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    ranked = sorted(range(len(p)), key=lambda t: -p[t])[:top_k or len(p)]
    kept, mass, total = [], 0.0, sum(p[t] for t in ranked)
    for token in ranked:
        kept.append(token)
        mass += p[token] / total
        if mass >= top_p:
            break
    kept = [token for token in kept if p[token] >= min_p * p[ranked[0]]]
    out = np.zeros_like(p)
    out[kept] = p[kept]
    return out / out.sum()


def sequence_distribution(prompt, length, steps) -> dict[tuple, float]:
    """Exact probability of each continuation of `length` tokens; steps[i](prefix) -> probs of token i."""
    dist = {(): 1.0}
    for step in steps[:length]:
        grown = {}
        for seq, prob in dist.items():
            p = step(list(prompt) + list(seq))
            for token in range(VOCAB):
                if p[token] > 0:
                    grown[seq + (token,)] = prob * p[token]
        dist = grown
    return dist


def chi_square(counts: dict[tuple, int], expected_probs: dict[tuple, float], draws: int):
    """Pearson's statistic, pooling outcomes expected fewer than 5 times into one bin; a sample in
    an outcome of probability 0 fails at once."""
    impossible = set(counts) - set(expected_probs)
    assert not impossible, f"drew outcomes of probability 0: {sorted(impossible)[:5]}"
    stat, bins, pooled_obs, pooled_exp = 0.0, 0, 0, 0.0
    for outcome, prob in expected_probs.items():
        expected, observed = prob * draws, counts.get(outcome, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat += (observed - expected) ** 2 / expected
        bins += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        bins += 1
    return stat, bins - 1


SAMPLING_CASES = [  # temperature, top_p, draft_len, other Sampler options
    pytest.param(1.0, 1.0, 2, {}, id="t1.0"),
    pytest.param(0.7, 1.0, 3, {}, id="t0.7"),
    pytest.param(1.3, 0.9, 2, {}, id="t1.3-top_p0.9"),
    pytest.param(1.2, 1.0, 2, {"top_k": 3, "min_p": 0.1}, id="top_k3-min_p0.1"),
    # Penalties depend on the tokens so far: draft and target must see the same context.
    pytest.param(1.0, 1.0, 3, {"repetition_penalty": 1.5, "frequency_penalty": 0.7, "presence_penalty": 0.4},
                 id="penalties"),
]


@pytest.mark.parametrize("temperature, top_p, draft_len, options", SAMPLING_CASES)
def test_speculative_sampling_matches_target_distribution(temperature, top_p, draft_len, options):
    check_sampling_distribution(lambda table, target: TableRunner(table), temperature, top_p, draft_len, options)


def check_sampling_distribution(make_draft, temperature, top_p, draft_len, options, **decoder_options):
    """Speculative sampling with the draft `make_draft(draft_table, target)` gives the target's
    sequence distribution (chi-square), and measurably not the draft's."""
    rng = np.random.default_rng(1234)
    target_table = rng.normal(scale=1.5, size=(3, VOCAB, VOCAB))
    draft_table = target_table + rng.normal(scale=1.5, size=target_table.shape)  # related, not equal
    target = TableRunner(target_table)
    draft = make_draft(draft_table, target)
    prompt, length, draws = [0, 3], 3, 12_000
    decoder = Decoder(target, draft, Sampler(temperature, top_p, seed=2026, **options), **decoder_options)

    counts: dict[tuple, int] = {}
    for _ in range(draws):
        tokens = run_decoder(decoder, prompt, length, draft_len)[:length]
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    stats = decoder.stats.as_dict()
    # Both branches of the rejection rule ran many times.
    assert 0.2 < stats["acceptance_rate"] < 0.9, stats

    filters = {key: options[key] for key in ("top_k", "min_p") if key in options}
    penalties = {key: value for key, value in options.items() if key not in filters}

    def model_step(runner):
        return lambda prefix: reference_probs(runner.logits_after(prefix), temperature, top_p, penalties=penalties,
                                              prefix=prefix, prompt_length=len(prompt), **filters)

    # The first token comes from the target's prefill; tokens 2 and 3 pass the rejection rule.
    exact = sequence_distribution(prompt, length, [model_step(target)] * length)
    stat, df = chi_square(counts, exact, draws)
    p_value = chi2_sf(stat, df)
    assert p_value > 1e-3, f"chi-square {stat:.1f} with {df} degrees of freedom: p = {p_value:.2g}"

    # Power: the same samples clearly reject the draft's distribution for tokens 2 and 3, which
    # is what accepting every proposal would give.
    drafty = sequence_distribution(prompt, length, [model_step(target)] + [model_step(draft)] * (length - 1))
    counts_possible = {k: v for k, v in counts.items() if k in drafty}
    stat, df = chi_square(counts_possible, drafty, sum(counts_possible.values()))
    assert chi2_sf(stat, df) < 1e-6


def test_sampler_top_p_matches_reference():
    rng = np.random.default_rng(7)
    for _ in range(50):
        logits = rng.normal(scale=2.0, size=VOCAB * 3)
        for temperature, top_p in ((1.0, 1.0), (0.5, 0.9), (2.0, 0.3), (1.0, 1e-6)):
            got = Sampler(temperature, top_p).probs(logits)
            np.testing.assert_allclose(got, reference_probs(logits, temperature, top_p), atol=1e-12)


def test_sampling_seed_reproducible(runtime_for):
    runtime = runtime_for(API_FAMILY)
    ids = runtime.tokenizer.encode(PROMPTS[0])
    first = runtime.generate(ids, max_new_tokens=16, temperature=1.0, seed=11)
    again = runtime.generate(ids, max_new_tokens=16, temperature=1.0, seed=11)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 16
    plain = runtime.generate(ids, max_new_tokens=16, temperature=1.0, seed=11, speculative=False)
    assert plain.token_ids == runtime.generate(ids, max_new_tokens=16, temperature=1.0, seed=11,
                                               speculative=False).token_ids
    others = [runtime.generate(ids, max_new_tokens=16, temperature=1.0, seed=seed).token_ids for seed in (12, 13)]
    assert any(other != first.token_ids for other in others)
    top_p = runtime.generate(ids, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    assert top_p.token_ids == runtime.generate(ids, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=5).token_ids


# ---------------------------------------------------------------------------------------------
# Python API


def test_prompt_forms(runtime_for, model_pair):
    from transformers import AutoTokenizer

    runtime = runtime_for(API_FAMILY)
    hf_tokenizer = AutoTokenizer.from_pretrained(model_pair(API_FAMILY)[0])
    text = PROMPTS[1]
    ids = runtime.tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    from_text = runtime.generate(text, max_new_tokens=8)
    assert from_text.token_ids == runtime.generate(ids, max_new_tokens=8).token_ids
    assert from_text.stats.prompt_tokens == len(ids)

    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Sort a list of names."}]
    chat_ids = runtime.tokenizer.encode_prompt(messages)
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert chat_ids == list(expected)
    from_chat = runtime.generate(messages, max_new_tokens=8)
    assert from_chat.token_ids == runtime.generate(chat_ids, max_new_tokens=8).token_ids
    assert from_chat.stats.prompt_tokens == len(chat_ids)

    with pytest.raises(TypeError):
        runtime.generate([1.5, 2.5], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runtime.generate([1, runtime.tokenizer.vocab_size], max_new_tokens=4)


def test_stream_pieces_make_the_text(runtime_for):
    runtime = runtime_for(API_FAMILY)
    for kwargs in (dict(), dict(speculative=False), dict(temperature=0.9, seed=3)):
        pieces = list(runtime.stream(PROMPTS[0], max_new_tokens=24, **kwargs))
        result = runtime.last_result
        assert len(pieces) > 1
        assert "".join(pieces) == result.text == runtime.tokenizer.decode(result.token_ids)
        assert not result.interrupted
        assert len(result.token_ids) == 24 or result.token_ids[-1] in runtime.tokenizer.eos_token_ids


def test_stop_string_truncates(runtime_for):
    runtime = runtime_for(API_FAMILY)
    full = runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    middle = len(full.text) // 2
    stop = full.text[middle:middle + 3]
    cut = full.text.find(stop)
    pieces = list(runtime.stream(PROMPTS[0], max_new_tokens=NEW_TOKENS, stop=["never-appears", stop]))
    result = runtime.last_result
    assert result.text == full.text[:cut] == "".join(pieces)
    assert stop not in "".join(pieces)
    assert len(result.token_ids) < len(full.token_ids)  # generation stopped early
    assert result.token_ids == full.token_ids[:len(result.token_ids)]
    assert runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, stop=[stop]).text == full.text[:cut]
    # An empty stop list or empty string stops nothing.
    assert runtime.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, stop=[""]).text == full.text


STATS_KEYS = ("tokens_per_second", "prefill_seconds", "decode_seconds", "acceptance_rate",
              "mean_accepted_per_round", "expert_calls", "expert_hit_rate", "bytes_paged")


def check_stats(stats: dict, new_tokens: int) -> None:
    for key in STATS_KEYS:
        assert key in stats, key
    assert stats["new_tokens"] == new_tokens
    assert stats["tokens_per_second"] > 0 and stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0
    assert 0 <= stats["acceptance_rate"] <= 1 and stats["mean_accepted_per_round"] >= 0
    assert isinstance(stats["expert_calls"], dict) and sum(stats["expert_calls"].values()) > 0
    assert set(stats["expert_calls"]) <= {"cpu", "cuda"}
    assert 0 <= stats["expert_hit_rate"] <= 1
    assert isinstance(stats["bytes_paged"], int) and stats["bytes_paged"] >= 0


def test_stats(runtime_for):
    runtime = runtime_for(API_FAMILY)
    result = runtime.generate(PROMPTS[0], max_new_tokens=12)
    check_stats(result.stats.as_dict(), 12)
    assert result.stats.experts.calls.get("cpu", 0) > 0
    # Counts are per generation, not cumulative.
    again = runtime.generate(PROMPTS[0], max_new_tokens=12)
    assert again.stats.experts.calls == result.stats.experts.calls
    assert result.stats.decode.acceptance_rate == again.stats.decode.acceptance_rate
    assert result.stats.decode.mean_accepted_per_round == pytest.approx(
        result.stats.decode.accepted / result.stats.decode.rounds)


def test_context_manager_and_close(exported):
    package = exported(API_FAMILY).output
    with Runtime(package, draft_len=1) as runtime:
        result = runtime.generate([5, 6, 7], max_new_tokens=3)
        assert len(result.token_ids) == 3 and result.stats.draft_len == 1
    with pytest.raises(RuntimeError, match="closed"):
        runtime.generate([5, 6, 7], max_new_tokens=3)
    with pytest.raises(RuntimeError, match="closed"):
        list(runtime.stream([5, 6, 7], max_new_tokens=3))
    runtime.close()  # closing twice is harmless


def profile_with_provider_options(path: Path, name: str, options: dict) -> Path:
    """The cpu-only profile with `options` for provider `name` (listed first), as a YAML file."""
    data = load_profile("cpu-only").to_dict()
    data["providers"] = [{"name": name, "options": options}] + [p for p in data["providers"] if p["name"] != name]
    path.write_text(yaml.safe_dump(data))
    return path


def test_profile_provider_options_reach_the_sessions(exported, tmp_path, monkeypatch):
    """The CPU EP does not report its options back, so the sessions' constructor is watched."""
    import onnxruntime as ort

    given = []

    class WatchedSession(ort.InferenceSession):
        def __init__(self, model, options=None, providers=None, **kwargs):
            given.append(providers)
            super().__init__(model, options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", WatchedSession)
    options = {"arena_extend_strategy": "kSameAsRequested"}
    profile = profile_with_provider_options(tmp_path / "cpu-options.yaml", "cpu", options)
    with Runtime(exported(API_FAMILY).output, profile=str(profile), draft_len=1) as runtime:
        runtime.generate([5, 6, 7], max_new_tokens=2)
    assert given and all(providers == [("CPUExecutionProvider", options)] for providers in given)


@pytest.mark.skipif(not cuda_available(), reason="needs the CUDA execution provider")
def test_profile_provider_options_reach_cuda_sessions(exported, tmp_path):
    profile = profile_with_provider_options(tmp_path / "cuda-options.yaml", "cuda",
                                            {"cudnn_conv_algo_search": "HEURISTIC"})
    with Runtime(exported(API_FAMILY).output, profile=str(profile), providers=["cuda"], strict=True) as runtime:
        options = runtime.target.embed.get_provider_options()["CUDAExecutionProvider"]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"


def test_top_level_import():
    import spac

    assert spac.Runtime is Runtime


def test_device_side_imports_without_torch_or_transformers():
    code = ("import spac.runtime, spac.ops, spac.runtime.cli, sys; from spac import Runtime; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_missing_package(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        Runtime(tmp_path / "no-such-package")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="manifest.yaml is missing"):
        Runtime(tmp_path / "empty")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["target"].pop("embed"), "missing field target.embed"),
    (lambda m: m.__setitem__("opset", "twenty"), "field opset must be int"),
    (lambda m: m["target"]["layers"][0].__setitem__("kind", "sparse"), "target.layers\\[0\\].kind"),
    (lambda m: m.__setitem__("schema_version", 99), "schema_version 99 is not supported"),
], ids=["field-missing", "wrong-type", "bad-value", "schema-version"])
def test_manifest_schema_error(package_copy, edit, message):
    path = package_copy / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    edit(manifest)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(ManifestError, match=message) as error:
        Runtime(package_copy)
    assert str(path) in str(error.value)


def test_corrupt_expert_file(package_copy):
    manifest = yaml.safe_load((package_copy / "manifest.yaml").read_text())
    name = sorted(n for n in manifest["files"] if n.endswith(".data"))[-1]
    data = bytearray((package_copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (package_copy / name).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256") as error:
        Runtime(package_copy)
    assert str(package_copy / name) in str(error.value)

    (package_copy / name).write_bytes(bytes(data[:-4]))  # truncated
    with pytest.raises(ManifestError, match="bytes") as error:
        Runtime(package_copy)
    assert str(package_copy / name) in str(error.value)

    (package_copy / name).unlink()
    with pytest.raises(ManifestError, match="missing") as error:
        Runtime(package_copy)
    assert name in str(error.value)


def test_prompt_too_long_and_bad_max_new_tokens(runtime_for):
    runtime = runtime_for(API_FAMILY)
    context = runtime.manifest.target.dims["max_position_embeddings"]
    assert context == 256
    for length in (context, context + 40):
        with pytest.raises(GenerationError, match=f"{length} tokens.*context is {context}"):
            runtime.generate([5] * length, max_new_tokens=4)
    for bad in (0, -3, 2.5, None):
        with pytest.raises(GenerationError, match="max_new_tokens"):
            runtime.generate(PROMPTS[0], max_new_tokens=bad)
    with pytest.raises(GenerationError, match="empty"):
        runtime.generate("", max_new_tokens=4)
    # The generation is capped by the context, and nothing was lost: the runtime still works.
    assert len(runtime.generate([5] * (context - 3), max_new_tokens=10).token_ids) == 3
    assert runtime.generate(PROMPTS[0], max_new_tokens=4).token_ids == \
        runtime.generate(PROMPTS[0], max_new_tokens=4, speculative=False).token_ids


def test_unknown_profile_lists_available(exported):
    with pytest.raises(ProfileError, match="unknown profile 'no-such-device'.*cpu-only"):
        Runtime(exported(API_FAMILY).output, profile="no-such-device")


def test_bad_draft_len(exported):
    with pytest.raises(ValueError, match="draft_len"):
        Runtime(exported(API_FAMILY).output, draft_len=-1)


def test_cuda_requested_but_unavailable(exported, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    package = exported(API_FAMILY).output
    with caplog.at_level("WARNING", logger="spac"):
        runtime = Runtime(package, providers=["cuda", "cpu"])
    try:
        assert runtime.provider == "cpu"
        assert any("CUDA" in record.getMessage() and "CPU" in record.getMessage() for record in caplog.records)
        result = runtime.generate(PROMPTS[0], max_new_tokens=4)
        assert set(result.stats.experts.calls) == {"cpu"}
    finally:
        runtime.close()
    with pytest.raises(RuntimeError, match="CUDA.*strict"):
        Runtime(package, providers=["cuda"], strict=True)
    with pytest.raises(ValueError, match="unknown provider"):
        Runtime(package, providers=["tpu"])


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def test_keyboard_interrupt_keeps_partial_result_and_runtime_usable(runtime_for, reference, monkeypatch):
    runtime = runtime_for(API_FAMILY)
    ids, expected = reference(API_FAMILY)
    target = runtime.target
    forward = ModelRunner.forward
    calls = {"n": 0}

    def interrupting_forward(self, tokens):
        if self is target:
            calls["n"] += 1
            if calls["n"] == 4:  # prefill + two verification rounds, then Ctrl-C
                raise KeyboardInterrupt
        return forward(self, tokens)

    monkeypatch.setattr(ModelRunner, "forward", interrupting_forward)
    with pytest.raises(KeyboardInterrupt):
        runtime.generate(ids, max_new_tokens=NEW_TOKENS)
    partial = runtime.last_result
    assert partial.interrupted
    assert 3 <= len(partial.token_ids) < NEW_TOKENS
    assert partial.token_ids == expected[:len(partial.token_ids)]
    assert partial.text == runtime.tokenizer.decode(partial.token_ids)
    assert partial.stats.new_tokens == len(partial.token_ids)

    # A caller that stops consuming the stream (its own Ctrl-C, or a break) still finds the
    # text so far and the stats in last_result once the generator is closed.
    calls["n"] = -10**9
    stream = runtime.stream(ids, max_new_tokens=NEW_TOKENS)
    first = next(stream)
    stream.close()
    assert runtime.last_result.text == first and runtime.last_result.stats.new_tokens >= 1

    monkeypatch.undo()
    again = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
    assert again.token_ids == expected and not again.interrupted


def test_text_assembler_holds_back_partial_characters_and_stop_prefixes(runtime_for):
    from spac.runtime.runtime import _TextAssembler

    tokenizer = runtime_for(API_FAMILY).tokenizer
    text = "x = 'héllo wörld 😀 ok'\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assembler = _TextAssembler(tokenizer, [])
    pieces = [assembler.add(ids[:n]) for n in range(1, len(ids) + 1)]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)

    # Generation ending inside a multi-byte character: the final call releases the held-back rest.
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    assembler = _TextAssembler(tokenizer, [])
    shown = "".join(assembler.add(ids[:n]) for n in range(1, cut))
    shown += assembler.add(ids[:cut], final=True)
    assert shown == tokenizer.decode(ids[:cut]) == assembler.text

    # A suffix that may become a stop string is not shown until it is known not to be one.
    assembler = _TextAssembler(tokenizer, ["wörld", "ok'"])
    pieces = [assembler.add(ids[:n]) for n in range(1, len(ids) + 1) if not assembler.stopped]
    assert "".join(pieces) == assembler.text == "x = 'héllo "
    assert assembler.stopped
