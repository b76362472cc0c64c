"""Tests for expert paging (spac.ops.pager), the utility estimators (spac.runtime.estimator) and
the pager's wiring into Runtime and spac-run.

- lossless: greedy tokens equal transformers' for every policy at host budgets of 100 %, 25 % and
  0 bytes (every expert computed from storage), with and without speculative decoding;
- the estimators' update rules, on hand-computed cases;
- the asynchronous engine's rules, on PagedExperts with a real package: frozen slots, evict-first,
  stale prefetches dropped, prefetches used;
- failure and shutdown: a worker exception reaches the caller within one round, close() stops
  the worker, a one-slot budget neither deadlocks nor changes the tokens;
- stats, in `result.stats` and `spac-run --json`, and storage reads that really hit the files.

Packages come from the session fixture `exported(family)`, shared with the other test files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from spac.ops.host_cache import POLICIES
from spac.ops.pager import PagedExperts
from spac.ops.sessions import SessionFactory
from spac.ops.storage import ExpertFiles
from spac.runtime import Runtime
from spac.runtime.estimator import DecayedCounts, SpacCounter, make_estimator
from spac.runtime.manifest import load_manifest
from spac.runtime.tokenizer import TextTokenizer

FAMILY = "mixtral"  # the engine, failure and stats tests use this one
OTHER_FAMILY = "qwen3_moe"  # shared with test_runtime and test_cli_run
BUDGETS = {"100%": 1.0, "25%": 0.25, "0 bytes": 0.0}  # fractions of the expert bytes
NEW_TOKENS = 24
DRAFT_LEN = 4
PROMPT = "def fibonacci(n):\n    "
REPETITIVE_PROMPT = "for i in range(10):\n    print(i)\n" * 4
TIMEOUT_S = 120  # generous for a busy 2-core machine; a deadlock never finishes


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def package(exported):
    return lambda family=FAMILY: exported(family).output


@pytest.fixture(scope="module")
def expected(model_pair, package):
    """expected(family, prompt=PROMPT) -> (prompt ids, transformers' greedy NEW_TOKENS tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    results = {}

    def get(family=FAMILY, prompt=PROMPT):
        if (family, prompt) not in results:
            ids = TextTokenizer(load_manifest(package(family))).encode(prompt)
            model = AutoModelForCausalLM.from_pretrained(model_pair(family)[0]).eval()
            with torch.no_grad():
                inputs = torch.tensor([ids])
                out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS,
                                     do_sample=False)
            results[family, prompt] = ids, out[0, len(ids):].tolist()
            assert len(results[family, prompt][1]) == NEW_TOKENS, "transformers stopped early: change PROMPT"
        return results[family, prompt]

    return get


def paged_runtime(package_dir, policy: str, fraction: float, estimator: str = "spac-counter") -> Runtime:
    """A Runtime whose routed experts go through PagedExperts with `fraction` of the expert bytes.

    Runtime keeps every expert resident (ResidentExperts, no pager) when the budget holds them
    all, so at 100 % the pager is built here with the full budget and swapped in."""
    runtime = Runtime(package_dir, draft_len=DRAFT_LEN, policy=policy, estimator=estimator,
                      host_budget=fraction if fraction < 1.0 else 0.0)
    if fraction >= 1.0:
        manifest, moe = runtime.manifest, runtime.manifest.target
        utility = make_estimator(estimator, moe.dims["num_layers"], moe.dims["num_experts"])
        runtime.experts.close()
        runtime.experts = runtime.target.experts = PagedExperts(
            manifest, runtime.sessions, manifest.expert_bytes_total(), policy, utility)
    assert isinstance(runtime.experts, PagedExperts)
    return runtime


def expert_bytes(package_dir) -> tuple[int, int]:
    """(bytes of one expert, bytes of all experts) of a package."""
    manifest = load_manifest(package_dir)
    return manifest.target.experts.bytes_per_expert, manifest.expert_bytes_total()


class FixedUtilities:
    """An estimator whose utilities the test sets: the engine's decisions become predictable."""

    def __init__(self, manifest):
        self.values = np.zeros((manifest.target.dims["num_layers"], manifest.target.dims["num_experts"]))

    def update(self, counts) -> None:
        pass

    def utilities(self) -> np.ndarray:
        return self.values


def make_pager(package_dir, slots: int, stop_worker: bool = True) -> tuple[PagedExperts, FixedUtilities]:
    """A spac pager with room for `slots` experts. With stop_worker the prefetch worker is stopped
    at once, so only the test moves slots."""
    manifest = load_manifest(package_dir)
    utilities = FixedUtilities(manifest)
    pager = PagedExperts(manifest, SessionFactory(1), slots * manifest.target.experts.bytes_per_expert,
                         "spac", utilities)
    if stop_worker:
        pager.stop_prefetching()
    return pager, utilities


def run_layer(pager: PagedExperts, layer: int, *tokens: tuple[int, int]) -> None:
    """Compute `layer` for one token per pair of experts given (its top-2); the last MoE layer
    ends the pass, as the decoder ends it after the target's forward."""
    hidden = pager.kernel.session.get_inputs()[0].shape[-1]
    x = np.random.default_rng(0).standard_normal((len(tokens), hidden)).astype(np.float32)
    pager.run(layer, x, np.array(tokens, dtype=np.int64), np.full((len(tokens), 2), 0.5, np.float32))
    if layer == pager.moe_layers[-1]:
        pager.end_round()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def generate_with_timeout(runtime: Runtime, *args, **kwargs):
    """runtime.generate in a thread: a deadlock fails the test instead of hanging it."""
    results = []
    thread = threading.Thread(target=lambda: results.append(runtime.generate(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"generation did not finish within {TIMEOUT_S} s (deadlock?)"
    assert results, "generation raised (see the thread's traceback above)"
    return results[0]


# ---------------------------------------------------------------------------------------------
# Lossless under memory pressure


@pytest.mark.parametrize("family", (FAMILY, OTHER_FAMILY))
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("policy", POLICIES)
def test_lossless_under_memory_pressure(family, policy, budget, package, expected):
    ids, want = expected(family)
    bytes_per_expert, total = expert_bytes(package(family))
    with paged_runtime(package(family), policy, BUDGETS[budget]) as runtime:
        assert runtime.experts.capacity == int(BUDGETS[budget] * total) // bytes_per_expert
        for speculative in (True, False):
            result = runtime.generate(ids, max_new_tokens=NEW_TOKENS, speculative=speculative)
            assert result.token_ids == want, f"speculative={speculative}"
            assert result.stats.policy == policy
            if budget == "0 bytes":  # every routed expert computed from storage
                assert result.stats.experts.paging.host_hits == 0
                assert result.stats.experts.paging.host_misses == result.stats.experts.calls["cpu"]


@pytest.mark.parametrize("policy", POLICIES)
def test_one_slot_neither_deadlocks_nor_changes_tokens(policy, package, expected):
    """A budget smaller than one layer's active experts degrades to computing from storage."""
    ids, want = expected()
    bytes_per_expert, _ = expert_bytes(package())
    with Runtime(package(), draft_len=DRAFT_LEN, policy=policy, host_budget=bytes_per_expert,
                 estimator="decayed") as runtime:
        assert runtime.experts.capacity == 1
        for speculative in (True, False):
            result = generate_with_timeout(runtime, ids, max_new_tokens=NEW_TOKENS, speculative=speculative)
            assert result.token_ids == want


# ---------------------------------------------------------------------------------------------
# Estimators


def test_spac_counter_follows_the_published_rule():
    """c − s ≥ 5 → s+1, s − c ≥ 1 → s−1, clipped to 0..5; one column per case, by hand."""
    counts = [  # tokens routed to experts 0..4 in rounds 1..6
        [5, 4, 5, 5, 5],
        [6, 4, 5, 0, 1],
        [7, 4, 5, 0, 1],
        [8, 4, 5, 9, 0],
        [9, 4, 5, 9, 0],
        [10, 4, 5, 9, 0],
    ]
    levels = [  # c − s, s − c per column
        [1, 0, 1, 1, 1],  # c − s = 5 climbs; 4 does not
        [2, 0, 1, 0, 1],  # 5 climbs; 4 holds; s − c = 1 drops; s = c holds
        [3, 0, 1, 0, 1],  # s = c = 0: the floor holds
        [4, 0, 1, 1, 0],  # c − s = 9 climbs one level only; s − c = 1 drops
        [5, 0, 1, 2, 0],  # c − s = 8 climbs again
        [5, 0, 1, 3, 0],  # c − s = 5 at the ceiling 5: stays; 7 climbs
    ]
    counter = SpacCounter(num_layers=1, num_experts=5)
    assert counter.name == "spac-counter"
    for round_counts, want in zip(counts, levels):
        counter.update(np.array([round_counts]))
        assert counter.utilities().tolist() == [want], f"after counts {round_counts}"


def test_decayed_counts_decay():
    estimator = DecayedCounts(num_layers=1, num_experts=3, decay=0.5)
    assert estimator.name == "decayed"
    estimator.update(np.array([[3, 1, 0]]))  # 4 routed slots: utility = share of them
    np.testing.assert_allclose(estimator.utilities(), [[0.75, 0.25, 0.0]])
    estimator.update(np.zeros((1, 3), dtype=np.int64))
    np.testing.assert_allclose(estimator.utilities(), [[0.375, 0.125, 0.0]])
    estimator.update(np.array([[0, 0, 2]]))
    np.testing.assert_allclose(estimator.utilities(), [[0.1875, 0.0625, 1.0]])
    # Unlike the counter, one token in a round already ranks an expert above unused ones.
    counter = SpacCounter(1, 3)
    counter.update(np.array([[1, 0, 0]]))
    assert counter.utilities()[0, 0] == 0


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="spac-counter"):
        make_estimator("oracle", 1, 8)


# ---------------------------------------------------------------------------------------------
# The asynchronous execution engine


def test_slots_of_the_layer_being_computed_are_frozen(package, monkeypatch):
    pager, utilities = make_pager(package(), slots=4)
    utilities.values[1, [2, 3]] = 5
    run_layer(pager, 0, (0, 1))
    run_layer(pager, 1, (2, 3))  # the pass ends: slots take the estimator's utilities
    assert {key: slot.utility for key, slot in pager.host.slots.items()} == {(0, 0): 0, (0, 1): 0, (1, 2): 5, (1, 3): 5}

    utilities.values[1, 7] = 9  # an expert worth more than any slot arrives while layer 0 computes
    admitted = []
    compute = pager.kernel.run

    def arrive_while_computing(*args):  # what the prefetch worker could do at that moment
        if pager.position.layer == 0 and not admitted:
            admitted.append(pager._admit((1, 7), pager.files.read(1, 7)))
        return compute(*args)

    monkeypatch.setattr(pager.kernel, "run", arrive_while_computing)
    run_layer(pager, 0, (0, 1))
    # It took a slot of layer 1: layer 0's slots are worth less but frozen.
    assert admitted == [True] and set(pager.host.slots) == {(0, 0), (0, 1), (1, 3), (1, 7)}

    # Between passes, while the draft runs, no layer is frozen, not even the last one computed.
    utilities.values[0, [0, 1]], utilities.values[1, 3] = 5, 0
    run_layer(pager, 1, (3, 7))  # the pass ends: slots take the new utilities
    utilities.values[0, 6] = 9
    assert pager._admit((0, 6), pager.files.read(0, 6))
    assert set(pager.host.slots) == {(0, 0), (0, 1), (0, 6), (1, 7)}


@pytest.mark.parametrize("slots", [1, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_expert_buffers_held_in_a_layer_stay_within_the_memory_plan(policy, slots, package, monkeypatch):
    """A layer whose tokens route to every expert: at any expert call the buffers alive are at
    most the cache's slots plus the misses read ahead without a room plus the one computed,
    what spac.runtime.memory budgets (PagedExperts.read_buffers). A miss the cache keeps is read
    into the room its victim left; before, every read ahead held a buffer beside the full cache
    (slots + 4 + 1), and each idle reader thread kept its last read alive. lru also used to keep
    each admitted miss referenced until the layer ended."""
    import weakref

    manifest = load_manifest(package())
    utilities = FixedUtilities(manifest)
    pager = PagedExperts(manifest, SessionFactory(1), slots * manifest.target.experts.bytes_per_expert, policy,
                         utilities if policy == "spac" else None)
    pager.stop_prefetching()
    alive, most = [], [0]
    fetch, compute = pager._fetch, pager.kernel.run

    def tracked_fetch(layer, expert):
        weights = fetch(layer, expert)
        alive.append(weakref.ref(next(iter(weights.values()))))
        return weights

    def counted_run(x, weights):
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        return compute(x, weights)

    monkeypatch.setattr(pager, "_fetch", tracked_fetch)
    monkeypatch.setattr(pager.kernel, "run", counted_run)
    experts = manifest.target.dims["num_experts"]
    try:
        run_layer(pager, 0, *[(e, (e + 1) % experts) for e in range(0, experts, 2)])
        run_layer(pager, 1, *[(e, (e + 1) % experts) for e in range(0, experts, 2)])
    finally:
        pager.close()
    outside = PagedExperts.outside_reads_ahead(policy, prepared=False, top_k=manifest.target.dims["top_k"]) + 1
    assert 0 < most[0] <= pager.capacity + outside, (most[0], pager.capacity, outside)
    assert len(pager.host.slots) <= pager.capacity and not pager.host.rooms


def test_a_kept_miss_takes_its_victims_slot_before_it_is_read():
    """make_room evicts the victim when the read starts, and its room counts in the capacity
    until the read is admitted into it (or given up); static keeps no miss and spac none worth
    less than every slot, so those get no room and evict nothing."""
    from spac.ops.host_cache import HostCache, PassPosition, Slot
    from spac.ops.stats import PagingStats

    def full_cache(policy: str) -> HostCache:
        cache = HostCache(policy, 2, PassPosition(layer=5), PagingStats())
        for expert, utility in ((0, 1.0), (1, 2.0)):
            cache.slots[(0, expert)] = Slot({"w": expert}, utility)
        return cache

    cache = full_cache("lru")
    assert cache.make_room((0, 7), 0.0) and set(cache.slots) == {(0, 1)}  # the least recently used went now
    assert cache.make_room((0, 8), 0.0) and not cache.slots
    assert not cache.make_room((0, 9), 0.0)  # every slot is a room: the read needs a buffer of its own
    assert cache.admit((0, 7), {"w": 7}, 0.0) and cache.rooms == {(0, 8)} and set(cache.slots) == {(0, 7)}
    cache.give_up_room((0, 8))  # its read failed
    assert cache.make_room((0, 9), 0.0) and set(cache.slots) == {(0, 7)}

    cache = full_cache("spac")
    assert not cache.make_room((0, 7), 0.5) and len(cache.slots) == 2  # outranks no slot: kept out
    assert cache.make_room((0, 7), 1.5) and set(cache.slots) == {(0, 1)}  # the weakest went
    assert not full_cache("static").make_room((0, 7), 9.0)
    layer_computed = full_cache("lru")
    layer_computed.position.layer = 0  # the slots' layer is being computed: none may go
    assert not layer_computed.make_room((0, 7), 0.0) and len(layer_computed.slots) == 2


def test_a_layer_just_computed_is_evicted_first(package):
    pager, utilities = make_pager(package(), slots=4)
    utilities.values[0, [0, 1]] = 5
    run_layer(pager, 0, (0, 1))
    run_layer(pager, 1, (2, 3))
    run_layer(pager, 0, (0, 1))  # the next pass computed layer 0
    # Its slots go before layer 1's, which are still to come in this pass, whatever their
    # utility (no layer frozen here, as between the layers of a deeper model).
    assert pager.host.victim(9.0, frozen_layer=-1)[0] == 0
    run_layer(pager, 1, (2, 3))  # the pass ends: utilities alone decide
    assert pager.host.victim(9.0, frozen_layer=-1)[0] == 1


def test_resident_lists_the_experts_in_fast_memory(package):
    pager, _ = make_pager(package(), slots=4)
    try:
        run_layer(pager, 0, (0, 1))
        assert pager.resident(0) == {0, 1} and pager.resident(1) == set()
    finally:
        pager.close()


def test_stale_prefetch_is_dropped(package, monkeypatch):
    """A queued prefetch whose layer has started in the current pass is dropped, never read."""
    pager, utilities = make_pager(package(), slots=3, stop_worker=False)
    gate, worker_reads = threading.Event(), []
    read = pager.files.read

    def gated_read(layer, expert, into=None):  # the worker's reads wait until the test opens the gate
        if threading.current_thread() is pager.prefetcher.worker:
            worker_reads.append((layer, expert))
            gate.wait(TIMEOUT_S)
        return read(layer, expert, into)

    monkeypatch.setattr(pager.files, "read", gated_read)
    try:
        utilities.values[0, 4], utilities.values[0, 5] = 3, 2
        run_layer(pager, 0, (0, 1))
        run_layer(pager, 1, (2, 3))  # end of pass 1: prefetch (0, 4) then (0, 5) for pass 2
        assert pager.stats.paging.prefetch_issued == 2
        wait_for(lambda: worker_reads == [(0, 4)])  # the worker is reading (0, 4), held
        run_layer(pager, 0, (0, 1))  # pass 2 starts layer 0: (0, 5) is now too late
        gate.set()
        wait_for(lambda: pager.stats.paging.prefetch_dropped == 1)
        assert worker_reads == [(0, 4)], "the stale request was never read"
        assert (0, 4) in pager.host.slots and (0, 5) not in pager.host.slots
        run_layer(pager, 1, (2, 3))
        run_layer(pager, 0, (4, 0))  # pass 3 uses what pass 2's prefetch brought
        assert pager.stats.paging.prefetch_used >= 1
    finally:
        gate.set()
        pager.close()
    assert not pager.prefetcher.worker.is_alive()


@pytest.mark.parametrize("estimator", ("spac-counter", "decayed"))
def test_prefetches_are_used(estimator, package):
    with Runtime(package(), draft_len=DRAFT_LEN, policy="spac", host_budget=0.5, estimator=estimator) as runtime:
        stats = runtime.generate(REPETITIVE_PROMPT, max_new_tokens=NEW_TOKENS).stats.experts.paging
    assert stats.prefetch_used > 0
    assert stats.prefetch_issued >= stats.prefetch_used


def test_plain_decoding_prefetches_nothing(package):
    """Without a draft the next pass starts at once: utility prefetches would only compete with
    its misses, so none is issued; the same runtime prefetches again once it drafts."""
    with Runtime(package(), draft_len=DRAFT_LEN, policy="spac", host_budget=0.5, estimator="decayed") as runtime:
        plain = runtime.generate(REPETITIVE_PROMPT, max_new_tokens=NEW_TOKENS, speculative=False)
        drafted = runtime.generate(REPETITIVE_PROMPT, max_new_tokens=NEW_TOKENS, speculative=True)
    assert plain.stats.experts.paging.host_misses > 0
    assert plain.stats.experts.paging.prefetch_issued == 0
    assert drafted.stats.experts.paging.prefetch_issued > 0


# ---------------------------------------------------------------------------------------------
# Failure and shutdown


def test_worker_exception_reaches_the_caller_within_one_round(package, monkeypatch):
    runtime = Runtime(package(), draft_len=DRAFT_LEN, policy="spac", host_budget=0.5, estimator="decayed")
    pager = runtime.experts
    failed_in_pass = []
    read = ExpertFiles.read

    def read_fails_for_prefetches(files, layer, expert, into=None):
        if threading.current_thread() is pager.prefetcher.worker:
            failed_in_pass.append(pager.position.pass_id)
            raise OSError("injected read error")
        return read(files, layer, expert, into)

    monkeypatch.setattr(ExpertFiles, "read", read_fails_for_prefetches)
    with runtime, pytest.raises(RuntimeError, match="prefetch worker") as raised:
        runtime.generate(REPETITIVE_PROMPT, max_new_tokens=NEW_TOKENS)
    assert isinstance(raised.value.__cause__, OSError)
    assert pager.position.pass_id <= failed_in_pass[0] + 1
    assert not pager.prefetcher.worker.is_alive(), "close() stopped the restarted worker too"


def test_worker_is_restarted_after_its_error_reached_the_caller(package, monkeypatch):
    runtime = Runtime(package(), draft_len=DRAFT_LEN, policy="spac", host_budget=0.5, estimator="decayed")
    pager = runtime.experts
    read, failures = ExpertFiles.read, []

    def first_prefetch_fails(files, layer, expert, into=None):
        if threading.current_thread() is pager.prefetcher.worker and not failures:
            failures.append((layer, expert))
            raise OSError("injected read error")
        return read(files, layer, expert, into)

    monkeypatch.setattr(ExpertFiles, "read", first_prefetch_fails)
    with runtime:
        with pytest.raises(RuntimeError, match="prefetch worker"):
            runtime.generate(REPETITIVE_PROMPT, max_new_tokens=NEW_TOKENS)
        assert pager.prefetcher.worker.is_alive()
        stats = runtime.generate(REPETITIVE_PROMPT, max_new_tokens=NEW_TOKENS).stats.experts.paging
        assert stats.prefetch_issued > 0 and stats.prefetch_used > 0


def test_close_stops_the_worker(package):
    runtime = Runtime(package(), draft_len=DRAFT_LEN, policy="spac", host_budget=0.5, estimator="decayed")
    worker = runtime.experts.prefetcher.worker
    runtime.generate(REPETITIVE_PROMPT, max_new_tokens=8)
    assert worker.is_alive()
    runtime.close()
    assert not worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.generate(PROMPT, max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# Stats


def assert_paging_stats(stats: dict) -> None:
    assert {"host", "storage"} <= set(stats["tiers"])
    assert {"hits", "misses"} <= set(stats["tiers"]["host"])
    assert {"reads", "bytes_read"} <= set(stats["tiers"]["storage"])
    assert set(stats["prefetch"]) == {"issued", "used", "dropped"}
    assert stats["stall_seconds"] >= 0
    assert 0 <= stats["expert_hit_rate"] <= 1
    assert stats["bytes_paged"] == stats["tiers"]["storage"]["bytes_read"]


@pytest.mark.parametrize("policy", ("lru", "static"))
def test_storage_reads_hit_the_files(policy, package, monkeypatch):
    """Every miss is one whole-file read of the expert's .data file (no prefetch in these policies;
    buffered reads, whose preads are counted here)."""
    bytes_per_expert, _ = expert_bytes(package())
    with Runtime(package(), draft_len=DRAFT_LEN, policy=policy, host_budget=0.25, direct_io=False) as runtime:
        preads = []
        pread = os.pread
        monkeypatch.setattr(os, "pread", lambda fd, n, offset: preads.append(pread(fd, n, offset)) or preads[-1])
        stats = runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS).stats.as_dict()
    assert_paging_stats(stats)
    misses = stats["tiers"]["host"]["misses"]
    assert misses > 0 and stats["tiers"]["storage"]["reads"] == misses == len(preads)
    assert stats["tiers"]["storage"]["bytes_read"] == misses * bytes_per_expert == sum(map(len, preads))


def test_storage_busy_time_counts_overlapping_reads_once(package, monkeypatch):
    """Reads made slow on purpose (a fault injected: 30 ms each) overlap on the reader threads:
    the storage's busy time is their union, less than their summed durations, and within the
    generation's wall time."""
    read = ExpertFiles.read

    def slow_read(files, layer, expert, into=None):
        time.sleep(0.03)
        return read(files, layer, expert, into)

    monkeypatch.setattr(ExpertFiles, "read", slow_read)
    with Runtime(package(), draft_len=DRAFT_LEN, policy="lru", host_budget=0.25) as runtime:
        started = time.perf_counter()
        stats = runtime.generate(PROMPT, max_new_tokens=NEW_TOKENS).stats.experts.paging
        wall = time.perf_counter() - started
    assert stats.storage_reads > 0
    assert 0.03 <= stats.busy_seconds < stats.read_seconds  # a layer's misses were read at once
    assert stats.busy_seconds <= wall
    assert stats.storage_reads * 0.03 <= stats.read_seconds


def spac_run(*args) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "spac-run"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "spac.runtime.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT_S)


def test_spac_run_policy_and_budget_flags(package, expected):
    ids, want = expected(OTHER_FAMILY)
    done = spac_run("--package", package(OTHER_FAMILY), "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS,
                    "--policy", "spac", "--host-budget", "25%", "--estimator", "decayed", "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["token_ids"] == want
    stats = payload["stats"]
    assert_paging_stats(stats)
    assert stats["policy"] == "spac" and stats["tiers"]["host"]["misses"] > 0

    bytes_per_expert, _ = expert_bytes(package(OTHER_FAMILY))
    done = spac_run("--package", package(OTHER_FAMILY), "--prompt", PROMPT, "--max-new-tokens", 4,
                    "--policy", "lru", "--host-budget", bytes_per_expert, "--no-speculative", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stats"]["policy"] == "lru"

    done = spac_run("--package", package(OTHER_FAMILY), "--prompt", PROMPT, "--host-budget", "150%")
    assert done.returncode == 2 and "at most 100%" in done.stderr
