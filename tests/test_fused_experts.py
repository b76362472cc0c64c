"""Resident block-quantized experts run as one QMoE session per layer (spac.ops.fused_experts):
the same sums as a session per expert, for every row count, routing and empty slot, for the
plain and GPT-OSS (biased, clamped) SwiGLU, int4 and int8, symmetric and not. Joined to their
layer's trunk graph (ModelRunner.join_experts) they give the logits, routing and stats of the
two graphs run apart; post-norm layers are not joined. Where ONNX Runtime cannot run QMoE, the
stack falls back to a session per expert."""

from __future__ import annotations

import numpy as np
import pytest

from spac import Runtime
from spac.ops import fused_experts
from spac.export.quantize import dequantize
from spac.ops.expert_graph import DTYPES
from spac.ops.experts import ResidentExperts
from spac.ops.quantization import PARTS
from spac.ops.sessions import SessionFactory
from spac.ops.storage import ExpertFiles
from spac.runtime.manifest import load_manifest
from spac.runtime.model import ModelRunner

CASES = [("qwen3_moe", {"experts": "int4"}), ("qwen3_moe", {"experts": "int8", "symmetric": True}),
         ("gpt_oss", {"experts": "int4"}), ("qwen3_moe", {"experts": "int4", "dtype": "float16"})]


def routing(rng, rows: int, num_experts: int, top_k: int):
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(rows)])
    weights = rng.random((rows, top_k)).astype(np.float32)
    return ids, weights


def exact_sum(manifest, layer: int, x, ids, weights) -> np.ndarray:
    """The routed experts' weighted sum in float64 from the dequantized weights (plain SwiGLU)."""
    files, quantization = ExpertFiles(manifest), manifest.target.experts.quantization
    out = np.zeros(x.shape, np.float64)
    for row, slot in zip(*np.nonzero(ids >= 0)):
        tensors = files.read(layer, int(ids[row, slot]))
        gate_up, down = (dequantize({part: tensors[f"{name}.{part}"] for part in PARTS if f"{name}.{part}" in tensors},
                                    quantization).astype(np.float64) for name in ("w_gate_up", "w_down"))
        gate, up = np.split(x[row].astype(np.float64) @ gate_up, 2)
        out[row] += weights[row, slot] * ((gate / (1 + np.exp(-gate)) * up) @ down)
    return out


@pytest.mark.parametrize("family,options", CASES, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in CASES])
def test_a_fused_layer_sums_what_a_session_per_expert_does(exported, family, options):
    manifest = load_manifest(exported(family, **options).output)
    sessions = SessionFactory(2)
    fused = ResidentExperts(manifest, sessions)
    assert fused.fused and not fused.sessions  # no session per expert beside the layers
    per_expert = ResidentExperts(manifest, sessions, preload=False)
    dims = manifest.target.dims
    rng = np.random.default_rng(0)
    for layer in manifest.target.moe_layers:
        for rows in (1, 6):
            x = rng.standard_normal((rows, dims["hidden_size"])).astype(DTYPES[manifest.dtype][0])
            ids, weights = routing(rng, rows, dims["num_experts"], dims["top_k"])
            weights = weights.astype(x.dtype)
            if rows > 1:
                ids[1, 0] = -1  # a self-draft's empty slot adds nothing
            expected = per_expert.run_resident(layer, x, ids, weights)
            got = fused.run_resident(layer, x, ids, weights)
            assert got.shape == expected.shape
            if x.dtype == np.float32:
                np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
            else:  # float16 rounds each path its own way: both against float64 arithmetic instead
                exact = exact_sum(manifest, layer, x, ids, weights)
                fused_error, apart_error = (np.abs(y.astype(np.float64) - exact).max() for y in (got, expected))
                assert fused_error <= 1.5 * apart_error, (fused_error, apart_error)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "flex_olmo"])
def test_a_joined_layer_computes_what_its_trunk_and_experts_do_apart(exported, family):
    manifest = load_manifest(exported(family, experts="int4").output)
    sessions = SessionFactory(2)
    runners, routing = {}, {}
    for name in ("joined", "apart"):
        runner = ModelRunner(manifest, manifest.target, sessions, ResidentExperts(manifest, sessions))
        routing[name] = []
        runner.on_routing = lambda layer, ids, seen=routing[name]: seen.append((layer, ids.tolist()))
        runners[name] = runner
    joined = runners["joined"].join_experts()
    post_norm = any(layer.post_experts for layer in manifest.target.layers)
    assert joined == (0 if post_norm else len(manifest.target.moe_layers))
    assert runners["joined"].joined == (set() if post_norm else set(manifest.target.moe_layers))
    prompt = np.random.default_rng(2).integers(0, manifest.target.dims["vocab_size"], 12).tolist()
    for tokens in (prompt, [5], [9], [4]):  # a prefill, then decode steps
        expected = runners["apart"].forward(tokens)
        got = runners["joined"].forward(tokens)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert routing["joined"] == routing["apart"] and routing["apart"]
    assert runners["joined"].experts.stats.calls == runners["apart"].experts.stats.calls


def test_a_package_runs_with_a_session_per_expert_where_qmoe_cannot_run(exported, monkeypatch):
    """ONNX Runtime before 1.23 has no CPU QMoE: the probe fails and the stack opens a session per
    expert, with the same tokens (to rounding: the greedy ids here)."""
    package = exported("qwen3_moe", experts="int4").output
    prompt = list(range(3, 19))
    with Runtime(package, draft="none") as runtime:
        assert runtime.target.joined == set(runtime.manifest.target.moe_layers)
        expected = runtime.generate(prompt, max_new_tokens=16).token_ids
    create = SessionFactory.create

    def refuse_qmoe(self, model, *args, **kwargs):
        if isinstance(model, bytes) and b"QMoE" in model:
            raise RuntimeError("Could not find an implementation for QMoE(1) node with name ''")
        return create(self, model, *args, **kwargs)

    monkeypatch.setattr(SessionFactory, "create", refuse_qmoe)
    monkeypatch.setattr(fused_experts, "_available", {})
    with Runtime(package, draft="none") as runtime:
        assert not runtime.target.joined and not runtime.experts.fused and runtime.experts.sessions
        assert runtime.generate(prompt, max_new_tokens=16).token_ids == expected


def test_float_experts_keep_a_session_each(exported):
    manifest = load_manifest(exported("qwen3_moe").output)
    assert not fused_experts.fusable(manifest, SessionFactory(1))
    experts = ResidentExperts(manifest, SessionFactory(1))
    assert not experts.fused and len(experts.sessions) == len(manifest.target.moe_layers) * manifest.target.dims["num_experts"]
