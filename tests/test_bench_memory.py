"""scripts/bench_memory.py's storage bound: Belady's MIN is optimal (checked by brute force on
small access strings) and the bound is the larger of the read time and the resident time."""

import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import bench_memory


def optimal_misses(accesses, capacity):
    """Fewest misses over every eviction choice (exhaustive: small inputs only)."""
    @functools.lru_cache(maxsize=None)
    def best(i, cache):
        if i == len(accesses):
            return 0
        key = accesses[i]
        if key in cache:
            return best(i + 1, cache)
        if len(cache) < capacity:
            return 1 + best(i + 1, cache | {key})
        return 1 + min(best(i + 1, (cache - {victim}) | {key}) for victim in cache)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_optimal(seed):
    rng = random.Random(seed)
    accesses = [(rng.randrange(2), rng.randrange(3)) for _ in range(rng.randrange(4, 13))]
    capacity = rng.randrange(1, 4)
    assert bench_memory.belady_misses(accesses, capacity) == optimal_misses(tuple(accesses), capacity)


def test_belady_without_a_cache_misses_everything():
    assert bench_memory.belady_misses([(0, 1), (0, 1), (1, 2)], 0) == 3


def test_bound_is_the_slower_of_reading_and_computing():
    run = {"routing": [(0, [1, 2]), (1, [3]), (0, [1, 2])], "slots": 2, "new_tokens": 2,
           "end_to_end_tokens_per_second": 1.0}
    # MIN with 2 slots: 1, 2, 3 miss; then 1 and 2 again: one of them was evicted for 3 -> 4 misses.
    bound = bench_memory.storage_bound(run, expert_bytes=100, bandwidth=1000.0, resident_seconds_per_token=0.01)
    assert bound["oracle_bytes_per_token"] == 4 * 100 / 2
    assert bound["bound_tokens_per_second"] == pytest.approx(1 / 0.2)
    fast_disk = bench_memory.storage_bound(run, 100, 1e9, resident_seconds_per_token=0.01)
    assert fast_disk["bound_tokens_per_second"] == pytest.approx(100.0)
    assert fast_disk["share_of_bound"] == pytest.approx(0.01)


def test_llama_cpp_folder_is_found_through_build_bin_or_skipped(tmp_path, capsys):
    """Both llama.cpp benchmarks take the same --llama-cpp folder; without its tools they skip."""
    import bench_llamacpp

    assert bench_memory.llama_binary(None) is None and bench_memory.llama_binary(tmp_path) is None
    assert bench_llamacpp.llama_cpp_tools(None) is None and bench_llamacpp.llama_cpp_tools(tmp_path) is None
    assert "skipped" in capsys.readouterr().out
    binaries = tmp_path / "build" / "bin"
    binaries.mkdir(parents=True)
    for name in ("llama-bench", "llama-quantize"):
        (binaries / name).write_text("")
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    assert bench_memory.llama_binary(tmp_path) == binaries / "llama-bench"
    assert bench_llamacpp.llama_cpp_tools(tmp_path)["bench"] == binaries / "llama-bench"
    (binaries / "llama-simple").write_text("")  # greedy on the real prompts where it was built
    assert bench_memory.llama_binary(tmp_path) == binaries / "llama-simple"


def test_llama_cpp_benchmark_exports_each_int4_layout_it_is_given():
    """--int4 names block layouts; each becomes spac-export's flags, and a bad one is refused by name."""
    import argparse

    import bench_llamacpp

    layouts = bench_llamacpp.int4_layouts("32, 128-symmetric")
    assert layouts == [(32, False), (128, True)]
    assert [bench_llamacpp.int4_flags(*layout) for layout in layouts] == [
        ("--experts", "int4", "--trunk", "int4"),
        ("--experts", "int4", "--trunk", "int4", "--block-size", "128", "--symmetric")]
    for bad in ("48", "128-sym", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            bench_llamacpp.int4_layouts(bad)


def test_agreement_counts_tokens_up_to_the_first_difference():
    reference = [[1, 2, 3, 4], [5, 6]]
    assert bench_memory.agreement(reference, reference) == 1.0
    assert bench_memory.agreement([[1, 2, 9, 4], [5]], reference) == 3 / 6  # a later match does not count
    assert bench_memory.agreement([[7], [8]], reference) == 0.0


def test_a_cached_gguf_belongs_to_the_model_it_was_converted_from(tmp_path):
    """Two testbeds share a folder name (small-moe): the conversion cached for one must not be
    benchmarked as the other (a 7 GB model was once measured in place of a 1.2 GB one)."""
    import gguf_convert

    def model(folder: str, width: int) -> Path:
        path = tmp_path / folder / "small-moe"
        path.mkdir(parents=True)
        (path / "config.json").write_text(f'{{"moe_intermediate_size": {width}}}')
        (path / "model.safetensors").write_bytes(b"x" * width)
        return path

    narrow, wide = model("testbed", 8192), model("testbed-wide", 49152)
    work = tmp_path / "work"
    assert gguf_convert.gguf_path(narrow, work) != gguf_convert.gguf_path(wide, work)
    assert gguf_convert.gguf_path(narrow, work) == gguf_convert.gguf_path(narrow, work)
    assert gguf_convert.gguf_path(narrow, work).parent == work
    before = gguf_convert.gguf_path(narrow, work)
    (narrow / "model.safetensors").write_bytes(b"y" * 10)  # the model was remade
    assert gguf_convert.gguf_path(narrow, work) != before


def test_a_contender_is_reported_by_its_median_run():
    runs = [{"tokens_per_second": 3.0, "hits": 1}, {"failed": "exit 1"}, {"tokens_per_second": 1.0, "hits": 2},
            {"tokens_per_second": 2.0, "hits": 3}]
    median = bench_memory.median_run(runs)
    assert median["hits"] == 3 and median["tokens_per_second"] == 2.0
    assert median["tokens_per_second_each"] == [3.0, None, 1.0, 2.0]
    assert bench_memory.median_run([{"failed": "refused"}]) == {"failed": "refused"}


def test_a_worker_runs_as_spac_run_does_with_one_thread_pool(exported):
    """The worker measures spac-run's configuration: every session on ONNX Runtime's process-wide
    thread pool (spac-run's default --thread-pool global), not the Python Runtime's default of a
    pool per session."""
    config = {"package": str(exported("qwen3_moe").output), "draft_len": 2, "threads": 1,
              "options": dict(bench_memory.CONTENDERS["spac"][0]), "speculative": False,
              "prompts": ["def f(x):"], "max_new_tokens": 3, "host_budget": 0.5}
    script = Path(bench_memory.__file__).resolve()
    done = subprocess.run([sys.executable, str(script), "--worker", json.dumps(config)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["thread_pool"] == "global"
    assert result["new_tokens"] > 0


def test_a_speculative_round_verifies_its_accepted_drafts_the_token_after_them_and_its_rejected_rows():
    import replay_speculative_reads as replay

    tokens = [[[i]] for i in range(6)]  # one MoE layer; token i routes to expert i
    stranger = [[99]]
    rng = random.Random(0)
    always = replay.speculative_rounds(tokens, 2, 1.0, rng, rejected_as_next=True, others=[stranger])
    assert always == [tokens[0:3], tokens[3:6]]  # every draft accepted: γ + 1 tokens a round
    never = replay.speculative_rounds(tokens, 2, 0.0, rng, rejected_as_next=False, others=[stranger])
    assert never[:4] == [[token, stranger, stranger] for token in tokens[:4]]  # one token a round, γ rejected rows
    assert never[4:] == [[tokens[4], stranger], [tokens[5]]]  # no drafts past the last token
    assert replay.accesses_of([[[[1, 2]], [[2, 3]]]]) == [(0, 1), (0, 2), (0, 3)]  # a layer reads its rows' union


def test_rejected_drafts_cost_reads_that_plain_decoding_does_not_make():
    """Without a cache every read counts: plain decoding reads a token's expert once; a round
    whose γ drafts are all rejected reads the γ tokens after it too, and yields one token."""
    import replay_speculative_reads as replay

    recorded = [{"prefill": [[0]], "tokens": [[[i]] for i in range(1, 9)]}]
    assert replay.reads_per_token(recorded, slots=0) == 1.0  # 8 reads, 8 decoded tokens
    rejected = replay.reads_per_token(recorded, slots=0, gamma=2, acceptance=0.0, rejected_as_next=True)
    assert rejected == (3 * 6 + 2 + 1) / 8  # the last two rounds have fewer tokens left to draft
    accepted = replay.reads_per_token(recorded, slots=0, gamma=2, acceptance=1.0)
    assert accepted == 1.0  # distinct experts: verifying them together saves nothing
    repeated = [{"prefill": [[0]], "tokens": [[[0]]] * 8}]
    assert replay.reads_per_token(repeated, slots=1) == 0.0  # the prefill's read fills the cache, uncounted


def test_belady_counts_only_the_marked_misses_but_caches_every_access():
    accesses = [(0, 1), (0, 2), (0, 1), (0, 3), (0, 2)]
    every = bench_memory.belady_misses(accesses, 1)
    assert bench_memory.belady_misses(accesses, 1, [True] * 5) == every == 5
    assert bench_memory.belady_misses(accesses, 2, [False, False, True, True, True]) == 1  # (0, 3) only
