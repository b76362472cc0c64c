"""Memory accounting (spac.runtime.memory, spac-run --memory-limit): limits read from cgroup
files, plans that refuse what cannot fit, and a run under a real cgroup-v1 cap that is not
OOM-killed where the same run without the limit is."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import memory_cap
from spac.export.testbed import widen_experts
from spac.runtime.manifest import load_manifest
from spac.runtime.tokenizer import TextTokenizer
from spac.runtime.memory import MemoryLimitError, available_memory, cgroup_limit, plan_memory, resolve_limit

WIDTH = 32768  # 25 MB fp32 experts, 16 of them: the experts outweigh the runtime itself
PROMPT = "def add(a, b):\n    return"
NEW_TOKENS = 12
# A prefill of ~90 tokens: on a batch MatMulNBits dequantizes into a workspace, which an arena
# would keep in every prepared session
LONG_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    paths = [p for p in argv if os.path.exists(p)]\n    for path in paths:\n        print(path, os.path.getsize(path))\n    return 0\n\n\ndef add(a, b):\n    return"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_limit_is_the_smallest_along_the_ancestors(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "4:memory:/jobs/one\n0::/\n")
    root = tmp_path / "sys"
    write(root / "memory/memory.limit_in_bytes", "9223372036854771712\n")  # the root: no limit
    write(root / "memory/jobs/memory.limit_in_bytes", "500000000\n")
    write(root / "memory/jobs/one/memory.limit_in_bytes", "800000000\n")
    assert cgroup_limit(proc, root) == 500000000
    write(root / "memory/jobs/memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_limit(proc, root) == 800000000


def test_cgroup_v2_limit_and_no_limit(tmp_path):
    proc, root = tmp_path / "cgroup", tmp_path / "sys"
    write(proc, "0::/user.slice/app\n")
    write(root / "user.slice/app/memory.max", "max\n")
    assert cgroup_limit(proc, root) is None
    write(root / "user.slice/memory.max", "268435456\n")
    assert cgroup_limit(proc, root) == 268435456


def test_meminfo_and_bad_values(tmp_path):
    write(tmp_path / "meminfo", "MemTotal:  1000 kB\nMemAvailable:  2048 kB\n")
    assert available_memory(tmp_path / "meminfo") == 2048 * 1024
    assert resolve_limit("auto") > 0
    for bad in (0, -5, "lots", 1.5):
        with pytest.raises(MemoryLimitError, match="positive number of bytes"):
            resolve_limit(bad)


def test_a_limit_below_the_loaded_runtime_is_refused_with_what_it_needs():
    with pytest.raises(MemoryLimitError, match=r"too small.*give at least \d+ MB"):
        plan_memory(10_000_000, kv_cache=0, read_buffers=0, slot_bytes=1_000_000)
    plan = plan_memory(64 << 30, kv_cache=1000, read_buffers=2000, slot_bytes=1_000_000)
    assert plan.host_budget == plan.limit - plan.resident - 3000 - plan.margin > 0
    assert plan.cache_slots == plan.host_budget // 1_000_000


def run_cli(*args, **options):
    return subprocess.run([sys.executable, "-m", "spac.runtime.cli", *args], capture_output=True, text=True,
                          **options)


def test_cli_refuses_a_bad_memory_limit(tmp_path):
    result = run_cli("--package", str(tmp_path), "--prompt", "x", "--memory-limit", "half")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--memory-limit" in result.stderr


@pytest.fixture(scope="module")
def wide_package(model_pair, tmp_path_factory):
    from spac.export.package import ExportOptions, export_package

    model_dir, draft_dir = model_pair("qwen3_moe")
    root = tmp_path_factory.mktemp("wide")
    wide = widen_experts(model_dir, root / "model", WIDTH).path
    export_package(ExportOptions(wide, draft_dir, root / "pkg", progress=False))
    model = AutoModelForCausalLM.from_pretrained(wide)
    ids = torch.tensor([TextTokenizer(load_manifest(root / "pkg")).encode_prompt(PROMPT)])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False)[0, ids.shape[1]:].tolist()
    return root / "pkg", expected


@pytest.mark.skipif(memory_cap.available() is not None, reason=memory_cap.available() or "")
def test_runs_inside_a_real_cgroup_cap_that_kills_the_unlimited_run(wide_package):
    package, expected = wide_package
    experts_bytes = 16 * 3 * 64 * WIDTH * 4
    args = ["--package", str(package), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS),
            "--json", "--policy", "lru", "--draft-len", "2"]
    # The cap: the experts' bytes, so that the runtime with a host cache for 15 of the 16
    # experts cannot fit it (with all 16 the experts would load resident, and ONNX Runtime maps
    # resident weights from the files: reclaimable page cache, not a kill). 48 MB more killed it
    # only while its reads ahead held buffers beside a full cache and idle readers kept theirs.
    cap = experts_bytes
    memory_cap.drop_page_cache()
    with memory_cap.MemoryCap(cap) as capped:
        result = capped.run([sys.executable, "-m", "spac.runtime.cli", *args, "--memory-limit", "auto", "--direct-io"],
                            capture_output=True, text=True)
        assert result.returncode == 0 and capped.oom_kills == 0, result.stderr[-2000:]
        assert capped.peak_bytes <= cap
    out = json.loads(result.stdout)
    assert out["token_ids"] == expected
    assert 0 < out["stats"]["bytes_paged"]  # the cap left room for only part of the experts
    with memory_cap.MemoryCap(cap) as capped:
        unlimited = capped.run([sys.executable, "-m", "spac.runtime.cli", *args, "--host-budget", "99%"],
                               capture_output=True, text=True)
        assert unlimited.returncode != 0 and capped.oom_kills > 0


@pytest.fixture(scope="module")
def wide_int4_package(model_pair, tmp_path_factory):
    """Int4 experts of 8 MB (width 65536), 16 of them, and the tokens the package gives with
    every expert resident (quantized tokens are the package's own, not transformers')."""
    from spac.export.package import ExportOptions, export_package
    from spac.runtime import Runtime

    model_dir, draft_dir = model_pair("qwen3_moe")
    root = tmp_path_factory.mktemp("wide-int4")
    wide = widen_experts(model_dir, root / "model", 2 * WIDTH).path
    export_package(ExportOptions(wide, draft_dir, root / "pkg", progress=False, experts="int4"))
    shutil.rmtree(root / "model")
    with Runtime(root / "pkg") as runtime:
        expected = runtime.generate(LONG_PROMPT, max_new_tokens=NEW_TOKENS, speculative=False).token_ids
    return root / "pkg", expected


@pytest.mark.skipif(memory_cap.available() is not None, reason=memory_cap.available() or "")
def test_paged_int4_experts_run_inside_a_cap_that_counts_their_sessions(wide_int4_package):
    """A cached int4 expert on the CPU is an ONNX Runtime session holding its weights and their
    prepacked copy: the plan must count that, not the expert's bytes on disk, and the session
    must not keep a batch's workspace."""
    package, expected = wide_int4_package
    experts_bytes = 16 * load_manifest(package).target.experts.bytes_per_expert
    cap = int(2.5 * experts_bytes)  # the plan that counted stored bytes got killed here
    memory_cap.drop_page_cache()
    with memory_cap.MemoryCap(cap) as capped:
        result = capped.run([sys.executable, "-m", "spac.runtime.cli", "--package", str(package), "--prompt", LONG_PROMPT,
                             "--max-new-tokens", str(NEW_TOKENS), "--json", "--policy", "lru", "--no-speculative",
                             "--memory-limit", "auto", "--direct-io"], capture_output=True, text=True)
        assert result.returncode == 0 and capped.oom_kills == 0, result.stderr[-2000:]
        assert capped.peak_bytes <= cap
    out = json.loads(result.stdout)
    assert out["token_ids"] == expected
    assert 0 < out["stats"]["bytes_paged"]


def test_a_self_draft_is_planned_without_a_draft_models_kv_cache(exported):
    from spac.runtime import Runtime
    from spac.runtime.memory import kv_cache_bytes

    package = exported("qwen3_moe").output
    manifest = load_manifest(package)
    context = manifest.target.dims["max_position_embeddings"]
    plans = {}
    for draft in ("model", "self"):
        with Runtime(package, draft=draft, memory_limit=8 << 30) as runtime:
            plans[draft], itemsize = runtime.memory, np.dtype(runtime.target.dtype).itemsize
            assert runtime.generate(PROMPT, max_new_tokens=4).token_ids  # the planned runtime runs
    target_kv = kv_cache_bytes(manifest.target, context, itemsize)
    assert plans["self"].kv_cache == target_kv  # it writes into the target's own cache
    assert plans["model"].kv_cache == target_kv + kv_cache_bytes(manifest.draft, context, itemsize)


def test_plain_decoding_counts_the_read_buffers_a_one_token_pass_can_use(exported, model_pair):
    """Without a draft a pass after the prefill routes one token: a top-2 layer has at most 2
    misses, one computed and one read ahead, so spac counts 2 buffers instead of 4 + 1, and its
    cache gets the difference; the prefill then reads no more than that ahead either."""
    from spac.runtime import Runtime

    package = exported("qwen3_moe").output
    manifest = load_manifest(package)
    assert manifest.target.dims["top_k"] == 2
    plans, tokens = {}, {}
    for draft in ("model", "none"):
        with Runtime(package, draft=draft, policy="spac", memory_limit=8 << 30) as runtime:
            plans[draft] = runtime.memory
        with Runtime(package, draft=draft, policy="spac", host_budget=0.25) as runtime:
            assert runtime.experts.outside_ahead == (1 if draft == "none" else 4)
            tokens[draft] = runtime.generate(PROMPT, max_new_tokens=8, speculative=False).token_ids
    bytes_per_expert = manifest.target.experts.bytes_per_expert
    assert plans["model"].read_buffers == 5 * bytes_per_expert
    assert plans["none"].read_buffers == 2 * bytes_per_expert
    ids = torch.tensor([TextTokenizer(manifest).encode_prompt(PROMPT)])
    model = AutoModelForCausalLM.from_pretrained(model_pair("qwen3_moe")[0])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False)[0, ids.shape[1]:].tolist()
    assert tokens["none"] == tokens["model"] == expected


def test_a_session_copies_the_weights_it_is_given_from_memory():
    """Given from memory, a graph's initializers become the session's own: the caller's buffer
    can change or go once the session exists (so a prepared expert or a QMoE layer does not keep
    its weights twice). An older ONNX Runtime (1.20) has the session keep the caller's arrays instead."""
    from onnx import TensorProto, helper

    from spac.ops.expert_graph import ExpertTensor, external_tensor
    from spac.ops.sessions import COPIES_IN_MEMORY_FILES, IN_MEMORY, SessionFactory

    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    tensors = [external_tensor(ExpertTensor("w", (2, 3), 0, 24, "float32"), IN_MEMORY),
               external_tensor(ExpertTensor("b", (3,), 24, 12, "float32"), IN_MEMORY)]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9).SerializeToString()
    session = SessionFactory(1).create(model, initializers=weights)
    x = np.zeros((2, 3), np.float32)
    expected = weights["w"] + weights["b"]
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)
    if not COPIES_IN_MEMORY_FILES:
        assert session.spac_initializers is not None
        return
    assert session.spac_initializers is None
    for array in weights.values():
        array[...] = -7  # the caller's buffer, overwritten: the session computes as before
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)


def test_a_memory_limit_that_pages_the_experts_decodes_without_the_draft_model_by_default(wide_package):
    """Under a limit whose cache holds fewer than all experts, a verify pass of γ + 1 tokens reads
    more bytes per token it yields than one-token decoding (the memory testbed: spac without SD
    1.31-1.73x spac+SD at caps of 30-75 %), so `draft` defaults to none there; a limit that
    holds every expert, or draft="model" asked for, keeps the draft model."""
    from spac.runtime import Runtime
    from spac.runtime.memory import MARGIN_BYTES, MARGIN_FRACTION, resident_bytes

    package, expected = wide_package
    manifest = load_manifest(package)
    experts, slot = 16, manifest.target.experts.bytes_per_expert

    def paging_limit() -> int:
        """A limit that leaves the cache about 6 of the 16 experts, from this process's resident
        set now (earlier tests and runtimes grew it) plus the trunk and draft it will load and
        the verify pass's 5 read buffers."""
        fixed = resident_bytes() + manifest.trunk_bytes() + 5 * slot + MARGIN_BYTES
        return int((fixed + 6 * slot) / (1 - MARGIN_FRACTION))

    with Runtime(package, memory_limit=paging_limit()) as paged:
        assert paged.draft_mode == "none" and paged.draft is None and paged.draft_len == 0
        assert 1 <= paged.memory.cache_slots < experts
        assert paged.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == expected
    with Runtime(package, memory_limit=paging_limit(), draft="model") as asked:
        assert asked.draft_mode == "model" and asked.draft is not None
        assert asked.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == expected
    with Runtime(package, memory_limit=8 << 30) as roomy:
        assert roomy.draft_mode == "model" and roomy.memory.cache_slots >= experts
