"""Packages without a draft model, and self-speculative decoding (the target drafts with the
experts it already holds): lossless greedy decoding against transformers for every family at
several host budgets, the sampling distribution, the CLI flags and the stats.

Packages come from the session fixture `exported(family)` (shared with test_runtime.py); the
no-draft package is exported once per module through the spac-export command.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import yaml

import make_models  # tests/conftest.py puts scripts/ on sys.path
from spac.export import cli as export_cli
from spac.ops.self_draft import SelfDraftExperts
from spac.runtime import Runtime
from test_runtime import (NEW_TOKENS, SAMPLING_CASES, TableRunner, check_sampling_distribution, hf_greedy,  # noqa: F401
                          reference, runtime_for)

FAMILIES = make_models.FAMILIES

NO_DRAFT_FAMILY = "qwen3_moe"


@pytest.fixture(scope="module")
def no_draft_export(model_pair, tmp_path_factory):
    """(package folder, the command's summary) of a target exported without --draft."""
    model_dir, _ = model_pair(NO_DRAFT_FAMILY)
    output = tmp_path_factory.mktemp("no-draft") / "package"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        assert export_cli.main([str(model_dir), "-o", str(output), "--quiet"]) == 0
    return output, summary.getvalue()


def test_export_without_a_draft_writes_no_draft_graphs(no_draft_export):
    package, summary = no_draft_export
    manifest = yaml.safe_load((package / "manifest.yaml").read_text())
    assert manifest["draft"] is None and manifest["source"]["draft"] is None
    assert not (package / "draft").exists()
    assert not [name for name in manifest["files"] if name.startswith("draft/")]
    assert "no draft" in summary and "passed: max abs logit diff target" in summary
    assert ", draft " not in summary  # no draft line in the verification either


def test_no_draft_package_decodes_like_transformers(no_draft_export, model_pair, hf_greedy, reference):
    ids, expected = reference(NO_DRAFT_FAMILY)
    with Runtime(no_draft_export[0], profile="cpu-only", draft_len=4) as runtime:
        assert runtime.draft is None
        result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected
    assert result.stats.draft_len == 0 and result.stats.decode.rounds == 0


def test_draft_mode_is_checked_against_the_package(no_draft_export, exported):
    with pytest.raises(ValueError, match="has no draft model .* valid here: self, none"):
        Runtime(no_draft_export[0], draft="model")
    with pytest.raises(ValueError, match="unknown draft mode 'twin'; valid: model, self, none"):
        Runtime(no_draft_export[0], draft="twin")
    with Runtime(exported(NO_DRAFT_FAMILY).output) as runtime:  # the default: the package's draft model
        assert runtime.draft_mode == "model" and runtime.draft.section is runtime.manifest.draft


# ---------------------------------------------------------------------------------------------
# Lossless self-speculative decoding, every family and budget

# budget name -> (host_budget, policy): every expert resident, a quarter paged by the spac policy
# (which prefetches the draft's lookahead), and nothing held (the draft holds no expert at all).
SELF_BUDGETS = {"100%": (None, None), "25%": (0.25, "spac"), "0 bytes": (0, "lru")}


@pytest.mark.parametrize("family", FAMILIES)
def test_self_draft_greedy_equals_transformers(family, exported, reference):
    ids, expected = reference(family)
    for budget, (host_budget, policy) in SELF_BUDGETS.items():
        with Runtime(exported(family).output, draft_len=4, draft="self", host_budget=host_budget,
                     policy=policy) as runtime:
            result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
            assert result.token_ids == expected, budget
            stats = result.stats
            assert stats.draft == "self" and stats.decode.rounds > 0, budget
            # The draft shares the target's cache, which holds all but the last token.
            assert runtime.draft.kv is runtime.target.kv
            assert runtime.target.length == len(ids) + NEW_TOKENS - 1
        rate = stats.draft_experts.substitution_rate
        if budget == "100%":  # the draft is the target itself
            assert rate == 0 and stats.decode.acceptance_rate == 1.0
        elif budget == "0 bytes":  # every routed expert missing: the draft runs the trunk alone
            assert rate == 1.0
        else:
            assert 0 < rate < 1, rate


def test_substitution_picks_the_best_held_experts_and_renormalises():
    """Hand-checked rows: 4 experts, top-2, experts 1 and 2 held."""

    class Held:
        def resident(self, layer):
            return {1, 2}

        def lookahead(self, layer, experts):
            wanted.append((layer, experts))

        def run_resident(self, layer, x, ids, weights):
            ran.append((ids.copy(), weights.copy()))
            return x

    wanted, ran = [], []
    x = np.ones((3, 2), np.float32)
    ids = np.array([[1, 2], [0, 2], [3, 0]])
    weights = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]], np.float32)
    logits = np.log(np.array([[1, 7, 3, 1], [6, 1, 4, 2], [4, 1, 2, 5]], np.float32))
    experts = SelfDraftExperts(Held(), num_experts=4)
    experts.run(0, x, ids, weights, logits)
    got_ids, got_weights = ran[-1]
    assert got_ids.tolist() == [[1, 2], [1, 2], [2, 1]]  # row 1: 0 -> 1; row 2: both missing -> 2, then 1
    np.testing.assert_allclose(got_weights, [[0.7, 0.3], [0.2, 0.8], [2 / 3, 1 / 3]], rtol=1e-6)
    assert wanted == [(0, [0, 3])]
    assert (experts.stats.routed, experts.stats.substituted) == (6, 3)

    experts.substitute = False  # dropping: the held experts keep their share, scaled to the total
    experts.run(0, x, ids, weights, logits)
    got_ids, got_weights = ran[-1]
    assert got_ids.tolist() == [[1, 2], [-1, 2], [-1, -1]]
    np.testing.assert_allclose(got_weights, [[0.7, 0.3], [0, 1.0], [0, 0]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Drafting from the package's draft copies of the experts (spac-export --draft-experts)

# A plain SwiGLU family, GPT-OSS's biased, clamped one, and a post-norm family (its layers end in
# a graph of their own), which cover every way a layer's experts are computed.
COPIES_FAMILIES = ("qwen3_moe", "gpt_oss", "flex_olmo")


def test_copies_compute_every_routed_expert_and_leave_the_prefetcher_alone():
    """Nothing is substituted with copies: every routed id goes to the copies' stack as routed;
    the ones the target does not hold are counted but not prefetched (that slowed the draft more
    than it saved the verify pass, see spac.ops.self_draft)."""

    class Stack:
        def __init__(self, held):
            self.held, self.ran, self.wanted = held, [], []

        def resident(self, layer):
            return self.held

        def lookahead(self, layer, experts):
            self.wanted.append((layer, experts))

        def run_resident(self, layer, x, ids, weights):
            self.ran.append((ids.copy(), weights.copy()))
            return x * 2

    target, copies = Stack({1, 2}), Stack(set())
    ids = np.array([[1, 2], [0, 2], [3, 0]])
    weights = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]], np.float32)
    x = np.ones((3, 2), np.float32)
    experts = SelfDraftExperts(target, num_experts=4, copies=copies)
    out = experts.run(2, x, ids, weights, router_logits=np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(out, x * 2)
    (got_ids, got_weights), = copies.ran
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_weights, weights)
    assert target.ran == [] and target.wanted == []
    assert (experts.stats.routed, experts.stats.substituted) == (6, 3)


@pytest.mark.parametrize("family", COPIES_FAMILIES)
def test_self_draft_from_copies_greedy_equals_transformers(family, exported, reference):
    ids, expected = reference(family)
    package = exported(family, draft_experts="int4").output
    accepted = {}
    for budget, (host_budget, policy) in SELF_BUDGETS.items():
        with Runtime(package, draft_len=4, draft="self", host_budget=host_budget, policy=policy) as runtime:
            assert runtime.draft_copies is not None and runtime.draft.experts.copies is runtime.draft_copies
            result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == expected, budget
        accepted[budget] = result.stats.decode.acceptance_rate
    # With nothing held, a draft without copies runs the trunk alone; the copies' draft is the
    # model with int4 experts, so it agrees with the target more often.
    with Runtime(exported(family).output, draft_len=4, draft="self", host_budget=0, policy="lru") as runtime:
        trunk_only = runtime.generate(ids, max_new_tokens=NEW_TOKENS).stats.decode.acceptance_rate
    assert accepted["0 bytes"] > trunk_only, (accepted, trunk_only)


def test_export_writes_a_narrower_copy_of_every_expert(exported):
    from spac.runtime.manifest import load_manifest
    from spac.runtime.profile import format_bytes

    result = exported(NO_DRAFT_FAMILY, draft_experts="int4")
    manifest = load_manifest(result.output)
    experts, copies = manifest.target.experts, manifest.target.draft_experts
    assert copies.quantization.bits == 4 and copies.spec == experts.spec
    assert copies.bytes_per_expert < experts.bytes_per_expert / 4
    assert len(manifest.draft_expert_data) == len(manifest.expert_data)
    assert all(name.startswith("target/draft_experts/") for name in manifest.draft_expert_data)
    # The copies' weights are neither experts the pager reads nor trunk the runtime always holds
    # (their small graphs count with the trunk, as the experts' graphs do).
    plain = load_manifest(exported(NO_DRAFT_FAMILY).output)
    graphs = sum(entry["bytes"] for name, entry in manifest.files.items()
                 if name.startswith("target/draft_experts/") and name.endswith(".onnx"))
    assert manifest.trunk_bytes() == plain.trunk_bytes() + graphs
    assert manifest.expert_bytes_total() == plain.expert_bytes_total()
    line = next(line for line in export_cli.summary(result).splitlines() if line.startswith("draft copies"))
    total = copies.bytes_per_expert * len(manifest.expert_data)
    assert "int4 (asymmetric, blocks of 32)" in line and format_bytes(total) in line, line


def test_a_memory_limit_the_draft_copies_would_not_fit_is_refused_before_they_load(exported):
    from spac.runtime.memory import MemoryLimitError

    package = exported(NO_DRAFT_FAMILY, draft_experts="int4").output
    with pytest.raises(MemoryLimitError, match=r"the draft copies of the experts \d+ MB, .* give at least"):
        Runtime(package, draft="self", memory_limit=10_000_000)
    with pytest.raises(MemoryLimitError) as refused:  # without a self-draft they are not counted
        Runtime(package, draft="none", memory_limit=10_000_000)
    assert "draft copies" not in str(refused.value)


@pytest.fixture(scope="module")
def copies_without_draft(model_pair, tmp_path_factory):
    """A target exported with int4 draft copies of its experts and no draft model."""
    model_dir, _ = model_pair(NO_DRAFT_FAMILY)
    output = tmp_path_factory.mktemp("copies-no-draft") / "package"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_cli.main([str(model_dir), "-o", str(output), "--draft-experts", "int4", "--quiet"]) == 0
    return output


def test_default_draft_is_self_only_where_it_was_measured_to_pay(copies_without_draft, no_draft_export, exported,
                                                                   reference):
    """Without a draft model: self SD from the copies where experts are paged and no memory limit
    takes the copies' room from the cache, with the profile's self_draft_len; none with every
    expert resident, under a memory limit, or without copies. A package's draft model stays the
    default where it has one, with the profile's draft_len."""
    ids, expected = reference(NO_DRAFT_FAMILY)
    with Runtime(copies_without_draft, host_budget=0.25, policy="spac") as runtime:
        assert runtime.draft_mode == "self" and runtime.draft_copies is not None
        assert runtime.draft_len == runtime.profile.self_draft_len != runtime.profile.draft_len
        result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected and result.stats.decode.rounds > 0
    assert result.stats.draft_len == runtime.profile.self_draft_len
    with Runtime(copies_without_draft, draft_len=3, host_budget=0.25) as runtime:
        assert runtime.draft_mode == "self" and runtime.draft_len == 3
    with Runtime(copies_without_draft, draft_len=4, host_budget=1.0) as runtime:
        assert runtime.draft_mode == "none" and runtime.draft_copies is None
    with Runtime(copies_without_draft, draft_len=4, memory_limit=4 << 30) as runtime:
        assert runtime.draft_mode == "none" and runtime.draft_copies is None
    with Runtime(no_draft_export[0], draft_len=4, host_budget=0.25) as runtime:
        assert runtime.draft_mode == "none"
    with Runtime(exported(NO_DRAFT_FAMILY, draft_experts="int4").output, host_budget=0.25) as runtime:
        assert runtime.draft_mode == "model" and runtime.draft_len == runtime.profile.draft_len


def test_draft_copies_are_loaded_only_to_self_draft(exported):
    package = exported(NO_DRAFT_FAMILY, draft_experts="int4").output
    with Runtime(package, draft="none", host_budget=0.25, policy="lru") as runtime:
        assert runtime.draft_copies is None
    with Runtime(package, draft="model", host_budget=0.25, policy="lru") as runtime:
        assert runtime.draft_copies is None and runtime.draft.section is runtime.manifest.draft


# ---------------------------------------------------------------------------------------------
# Sampling stays the target's distribution


class SharedCacheTableRunner(TableRunner):
    """A self-draft's stand-in: its own logits table, the target's sequence (KV cache) as its own,
    so it writes the speculative positions where the target verifies."""

    def __init__(self, table, target: TableRunner):
        self.target = target
        super().__init__(table)

    sequence = property(lambda self: self.target.sequence, lambda self, value: setattr(self.target, "sequence", value))


@pytest.mark.parametrize("temperature, top_p, draft_len, options", SAMPLING_CASES)
def test_self_draft_sampling_matches_target_distribution(temperature, top_p, draft_len, options):
    check_sampling_distribution(SharedCacheTableRunner, temperature, top_p, draft_len, options)


def test_drafting_stopped_by_confidence_keeps_the_distribution():
    """The draft length then depends on the draft's probabilities: still the target's law."""
    check_sampling_distribution(SharedCacheTableRunner, 1.0, 1.0, 3, {}, min_confidence=0.4)


def test_drafting_stopped_by_confidence_keeps_greedy_lossless(exported, reference):
    ids, expected = reference(NO_DRAFT_FAMILY)
    with Runtime(exported(NO_DRAFT_FAMILY).output, draft_len=4, draft="self", host_budget=0.25, policy="spac",
                 min_draft_confidence=0.9) as runtime:
        result = runtime.generate(ids, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected
    assert result.stats.decode.proposed < 4 * result.stats.decode.rounds  # some rounds stopped early
    with pytest.raises(ValueError, match=r"min_draft_confidence must be in \[0, 1\], got 1.5"):
        Runtime(exported(NO_DRAFT_FAMILY).output, min_draft_confidence=1.5)


# ---------------------------------------------------------------------------------------------
# spac-run --draft and the stats


def test_spac_run_draft_flag_and_stats(no_draft_export, capsys):
    from spac.runtime import cli

    package = str(no_draft_export[0])
    common = ["--package", package, "--prompt", "def f(x):", "--max-new-tokens", "16", "--host-budget", "25%",
              "--policy", "spac"]
    assert cli.main([*common, "--draft", "self", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    stats = payload["stats"]
    assert stats["draft"] == "self" and stats["draft_len"] > 0 and stats["rounds"] > 0
    assert 0 < stats["draft_substitution_rate"] < 1
    assert stats["draft_seconds_per_round"] > 0 and stats["verify_seconds_per_round"] > 0
    assert stats["prefetch"]["issued"] > 0  # the draft's lookahead

    assert cli.main([*common, "--draft", "none", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["token_ids"] == payload["token_ids"]
    assert plain["stats"]["draft"] == "none" and plain["stats"]["rounds"] == 0

    assert cli.main([*common, "--draft", "self"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "draft self, substitution " in line and " ms / verify " in line

    assert cli.main([*common, "--draft", "model"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "has no draft model" in errors[0] and "valid here: self, none" in errors[0]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*common, "--draft", "twin"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'twin'" in capsys.readouterr().err


def test_stats_sum_and_flatten_the_draft_fields():
    from spac.ops.stats import DraftExpertStats
    from spac.runtime.speculative import DecodeStats
    from spac.runtime.stats import GenerationStats

    one = GenerationStats(decode=DecodeStats(rounds=2, draft_seconds=0.02, verify_seconds=0.04), draft="self",
                          draft_experts=DraftExpertStats(routed=10, substituted=5))
    two = GenerationStats(decode=DecodeStats(rounds=2, draft_seconds=0.06, verify_seconds=0.04), draft="self",
                          draft_experts=DraftExpertStats(routed=30, substituted=5))
    flat = (one + two).as_dict()
    assert flat["draft"] == "self" and flat["draft_substitution_rate"] == pytest.approx(0.25)
    assert flat["draft_seconds_per_round"] == pytest.approx(0.02)
    assert flat["verify_seconds_per_round"] == pytest.approx(0.02)
