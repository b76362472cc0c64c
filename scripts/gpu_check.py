#!/usr/bin/env python3
"""GPU check: CUDA-EP expert slots with host → device paging on a Qwen3-30B-A3B-shaped model,
SD + spac against SD + static and lru, in one run. Run it through scripts/gpu_check.sh (one
command of at most 8 minutes on a lent GPU machine; no network there).

    scripts/gpu_check.sh                 # on the GPU machine: figures to $OUT/gpu_check.json
    scripts/gpu_check.sh --dry-run       # anywhere: tiny shape, CPU only, in well under a minute

Stages, each written to the JSON file as soon as it is done (a run cut short keeps what it had):

1. environment: onnxruntime.get_available_providers(), whether a CUDA session really runs, and
   torch/nvidia-smi when present. Without the CUDA EP it says so and runs what it can.
2. package: a random-weight package of Qwen3-30B-A3B's shape (hidden 2048, 32 query / 4 KV heads
   of 128, 128 experts of moe_intermediate 768, top-8) with --layers MoE layers, float32. The GPU
   machine has neither torch nor transformers (nor room to carry a multi-GB package there), so
   the trunk graphs are written here with onnx.helper; the experts, the file table and the
   manifest come from the package's own code (spac.ops.expert_graph, EXPERT_FILE_PATTERN,
   write_package_manifest), as spac-export writes them. Routing of random weights is almost
   i.i.d. across tokens.
3. device: the host tier holds every expert (preloaded), the device tier --device-budget of the
   expert bytes (a copy of profiles/h100-budget.yaml), experts on the CUDA EP through DeviceSlots
   and the balancer. Without CUDA the slots' kernel runs on the CPU EP instead (labelled: the
   code path is exercised, the timings say nothing about a GPU).
4. host: storage → host paging on the CPU EP at --host-budget (cold cache), as scripts/bench.py.
5. torch: host → device copy bandwidth and one expert's GPU time through torch, when torch sees
   a GPU (figures for the profile's link and cost fields).

Runs per mode, each in a fresh Runtime on the same prompts: lru (no SD) first (its tokens are the
reference), static+SD (frequencies: the lru run's routing counts, an oracle), lru+SD, spac+SD with
each estimator. The random draft would never be accepted, so a scripted draft wraps it: it runs
the real draft graph (its cost) and then proposes the reference token with probability
--acceptance per position (fixed by a seed), so the verify passes see a realistic acceptance and
the output stays the target's greedy output (checked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from functools import reduce
from operator import add
from pathlib import Path

import numpy as np

from spac.bench.measure import CONFIGS, SPAC
from spac.bench.prompts import function_openings, stdlib_root

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SHAPES = {
    # Qwen3-30B-A3B's layer shape; the draft is small: the scripted wrapper decides acceptance.
    "qwen3-30b-a3b": dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8,
                          expert_intermediate=768, vocab=2048, draft_hidden=512, draft_heads=8,
                          draft_kv_heads=4, draft_head_dim=64, draft_intermediate=1536, draft_layers=2),
    "tiny": dict(hidden=128, heads=4, kv_heads=2, head_dim=32, experts=16, top_k=4, expert_intermediate=64,
                 vocab=512, draft_hidden=64, draft_heads=2, draft_kv_heads=1, draft_head_dim=32,
                 draft_intermediate=128, draft_layers=1),
}
MAX_POSITIONS = 4096
ROPE_THETA = 1_000_000.0
PROMPT_MODULES = ("bisect.py", "heapq.py", "textwrap.py", "shlex.py")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shape, few tokens: checks the script anywhere")
    p.add_argument("--shape", choices=tuple(SHAPES), help="default: qwen3-30b-a3b (tiny with --dry-run)")
    p.add_argument("--layers", type=int, default=2, help="MoE layers of the target")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--acceptance", type=float, default=0.7, help="scripted draft: P(proposal is right) per token")
    p.add_argument("--device-budget", type=float, default=0.17, help="device tier, fraction of expert bytes")
    p.add_argument("--host-budget", type=float, default=0.17, help="host tier in the CPU paging mode")
    p.add_argument("--host-max-new-tokens", type=int, default=16,
                   help="per prompt in the CPU paging mode, on one prompt (random routing reads ~GBs per token)")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--modes", default="device,host", help="comma-separated: device, host, torch")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds; no new run starts when less than a run's expected time is left")
    p.add_argument("--workdir", type=Path, help="where the package is built (default: a temp folder)")
    p.add_argument("--out", type=Path, help="JSON file (default: $OUT/gpu_check.json, else results/gpu_check.json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.dry_run else "qwen3-30b-a3b")
    if args.dry_run:
        args.prompts, args.max_new_tokens = min(args.prompts, 1), min(args.max_new_tokens, 12)
    if args.out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "results"
        args.out = base / "gpu_check.json"
    args.modes = [m for m in args.modes.split(",") if m]
    return args


# =============================================================================================
# 1. Environment


def environment() -> dict:
    import onnxruntime as ort

    from spac.ops.sessions import cuda_available

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
           "cuda_ep_listed": cuda_available(), "cuda_ep_runs": False}
    print(f"onnxruntime {ort.__version__}: get_available_providers() = {env['available_providers']}", flush=True)
    if env["cuda_ep_listed"]:
        env["cuda_ep_runs"], env["cuda_ep_error"] = cuda_session_runs()
    if not env["cuda_ep_runs"]:
        why = "not listed" if not env["cuda_ep_listed"] else f"listed but a session fails: {env.get('cuda_ep_error')}"
        print(f"NO CUDA EXECUTION PROVIDER ({why}): this onnxruntime cannot run experts on a GPU "
              "(install onnxruntime-gpu). Running what can run: the device-tier code path with its slots on "
              "the CPU EP, and the CPU paging comparison.", flush=True)
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.cuda.is_available()
        if env["torch_cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    return env


def cuda_session_runs() -> tuple[bool, str | None]:
    """Whether a one-node graph really runs on the CUDA EP (onnxruntime-gpu lists it even when
    the CUDA libraries are missing, then falls back to the CPU)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        ok = "CUDAExecutionProvider" in session.get_providers()
        session.run(None, {"x": np.ones(4, np.float32)})
        return ok, None if ok else f"session providers {session.get_providers()}"
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return False, str(error)[:300]


# =============================================================================================
# 2. The package, written directly (numpy + onnx)


class Graph:
    """A small onnx.helper graph builder: op() returns output names, const() an initializer's."""

    def __init__(self, name: str):
        self.name, self.nodes, self.inits, self.count = name, [], [], 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs, outputs=1, **attrs):
        from onnx import helper

        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    def model(self, inputs, outputs):
        from onnx import helper

        from spac.ops.expert_graph import OPSET

        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="moe-spac")
        model.ir_version = 9
        return model


def rms_norm(g: Graph, x: str, hidden: int) -> str:
    squares = g.op("Mul", [x, x])
    mean = g.op("ReduceMean", [squares, g.const(np.array([-1], np.int64))], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(np.float32(1e-6))])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), g.const(np.ones(hidden, np.float32), "norm")])


def rope(g: Graph, t: str, cos: str, sin: str) -> str:
    first, second = g.op("Split", [t], outputs=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
    return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rotated, sin])])


def attention(g: Graph, hidden: str, cos: str, sin: str, past_k: str, past_v: str, dims: dict, rng):
    """Grouped-query attention with RoPE and an explicit KV cache; (residual, present_k, present_v)."""
    h, heads, kv, d = dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"]
    x = rms_norm(g, hidden, h)

    def project(width: int, count: int, hint: str) -> str:
        w = g.const((rng.standard_normal((h, width), np.float32) * 0.02), hint)
        y = g.op("Reshape", [g.op("MatMul", [x, w]), g.const(np.array([1, -1, count, d], np.int64))])
        return g.op("Transpose", [y], perm=[0, 2, 1, 3])

    cos4 = g.op("Unsqueeze", [cos, g.const(np.array([1], np.int64))])
    sin4 = g.op("Unsqueeze", [sin, g.const(np.array([1], np.int64))])
    q = rope(g, project(heads * d, heads, "wq"), cos4, sin4)
    k = rope(g, project(kv * d, kv, "wk"), cos4, sin4)
    v = project(kv * d, kv, "wv")
    present_k = g.op("Concat", [past_k, k], outputs=["present_first"], axis=2)
    present_v = g.op("Concat", [past_v, v], outputs=["present_second"], axis=2)
    q5 = g.op("Reshape", [q, g.const(np.array([1, kv, heads // kv, -1, d], np.int64))])
    k5 = g.op("Transpose", [g.op("Unsqueeze", [present_k, g.const(np.array([2], np.int64))])], perm=[0, 1, 2, 4, 3])
    scores = g.op("Mul", [g.op("MatMul", [q5, k5]), g.const(np.float32(1 / math.sqrt(d)))])
    # Causal mask: query t (absolute position past + t) sees keys s <= past + t.
    past = g.op("Squeeze", [g.op("Shape", [past_k], start=2, end=3)])
    total = g.op("Add", [past, g.op("Squeeze", [g.op("Shape", [hidden], start=1, end=2)])])
    one = g.const(np.int64(1))
    keys = g.op("Unsqueeze", [g.op("Range", [g.const(np.int64(0)), total, one]), g.const(np.array([0], np.int64))])
    queries = g.op("Unsqueeze", [g.op("Range", [past, total, one]), g.const(np.array([1], np.int64))])
    bias = g.op("Where", [g.op("LessOrEqual", [keys, queries]), g.const(np.float32(0)), g.const(np.float32(-1e9))])
    probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
    v5 = g.op("Unsqueeze", [present_v, g.const(np.array([2], np.int64))])
    out = g.op("Reshape", [g.op("MatMul", [probs, v5]), g.const(np.array([1, heads, -1, d], np.int64))])
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]), g.const(np.array([1, -1, heads * d], np.int64))])
    wo = g.const(rng.standard_normal((heads * d, h), np.float32) * 0.02, "wo")
    return g.op("Add", [hidden, g.op("MatMul", [out, wo])]), present_k, present_v


def trunk_inputs(dims: dict):
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    kv_shape = [1, dims["kv_heads"], "past", dims["head_dim"]]
    return [helper.make_tensor_value_info("hidden", f, [1, "tokens", dims["hidden"]]),
            helper.make_tensor_value_info("rope_cos", f, [1, "tokens", dims["head_dim"]]),
            helper.make_tensor_value_info("rope_sin", f, [1, "tokens", dims["head_dim"]]),
            helper.make_tensor_value_info("past_first", f, kv_shape),
            helper.make_tensor_value_info("past_second", f, kv_shape)]


def kv_outputs(dims: dict):
    from onnx import TensorProto, helper

    shape = [1, dims["kv_heads"], "total", dims["head_dim"]]
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("present_first", "present_second")]


def moe_layer_graph(dims: dict, rng):
    from onnx import TensorProto, helper

    g = Graph("moe_layer")
    residual, pk, pv = attention(g, "hidden", "rope_cos", "rope_sin", "past_first", "past_second", dims, rng)
    g.op("Identity", [residual], outputs=["residual"])
    x = rms_norm(g, residual, dims["hidden"])
    g.op("Squeeze", [x, g.const(np.array([0], np.int64))], outputs=["moe_input"])
    router = g.const(rng.standard_normal((dims["hidden"], dims["experts"]), np.float32) * 4 / math.sqrt(dims["hidden"]),
                     "router")
    probs = g.op("Softmax", [g.op("MatMul", ["moe_input", router], outputs=["router_logits"])], axis=-1)
    values, _ = g.op("TopK", [probs, g.const(np.array([dims["top_k"]], np.int64))], outputs=["topk_values", "topk_ids"],
                     axis=-1)
    g.op("Div", [values, g.op("ReduceSum", [values, g.const(np.array([-1], np.int64))], keepdims=1)],
         outputs=["topk_weights"])
    f = TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info("residual", f, [1, "tokens", dims["hidden"]]),
               helper.make_tensor_value_info("moe_input", f, ["tokens", dims["hidden"]]),
               helper.make_tensor_value_info("topk_ids", TensorProto.INT64, ["tokens", dims["top_k"]]),
               helper.make_tensor_value_info("topk_weights", f, ["tokens", dims["top_k"]]),
               helper.make_tensor_value_info("router_logits", f, ["tokens", dims["experts"]]), *kv_outputs(dims)]
    return g.model(trunk_inputs(dims), outputs)


def dense_layer_graph(dims: dict, rng):
    from onnx import TensorProto, helper

    g = Graph("dense_layer")
    residual, pk, pv = attention(g, "hidden", "rope_cos", "rope_sin", "past_first", "past_second", dims, rng)
    x = rms_norm(g, residual, dims["hidden"])
    h, i = dims["hidden"], dims["intermediate"]
    gate = g.op("MatMul", [x, g.const(rng.standard_normal((h, i), np.float32) * 0.02, "wg")])
    up = g.op("MatMul", [x, g.const(rng.standard_normal((h, i), np.float32) * 0.02, "wu")])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    down = g.op("MatMul", [act, g.const(rng.standard_normal((i, h), np.float32) * 0.02, "wd")])
    g.op("Add", [residual, down], outputs=["hidden_out"])
    outputs = [helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, [1, "tokens", h]), *kv_outputs(dims)]
    return g.model(trunk_inputs(dims), outputs)


def embed_graph(dims: dict, vocab: int, rng):
    from onnx import TensorProto, helper

    g = Graph("embed")
    table = g.const(rng.standard_normal((vocab, dims["hidden"]), np.float32), "embedding")
    g.op("Gather", [table, "input_ids"], outputs=["hidden"], axis=0)
    d = dims["head_dim"]
    inv_freq = (1.0 / ROPE_THETA ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
    positions = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT),
                                   g.const(np.array([-1], np.int64))])
    freqs = g.op("Mul", [positions, g.const(inv_freq, "inv_freq")])
    angles = g.op("Concat", [freqs, freqs], axis=-1)
    g.op("Cos", [angles], outputs=["rope_cos"])
    g.op("Sin", [angles], outputs=["rope_sin"])
    i64, f = TensorProto.INT64, TensorProto.FLOAT
    return g.model([helper.make_tensor_value_info("input_ids", i64, [1, "tokens"]),
                    helper.make_tensor_value_info("position_ids", i64, [1, "tokens"])],
                   [helper.make_tensor_value_info("hidden", f, [1, "tokens", dims["hidden"]]),
                    helper.make_tensor_value_info("rope_cos", f, [1, "tokens", d]),
                    helper.make_tensor_value_info("rope_sin", f, [1, "tokens", d])])


def head_graph(dims: dict, vocab: int, rng):
    from onnx import TensorProto, helper

    g = Graph("head")
    x = rms_norm(g, "hidden", dims["hidden"])
    g.op("MatMul", [x, g.const(rng.standard_normal((dims["hidden"], vocab), np.float32) * 0.02, "lm_head")],
         outputs=["logits"])
    f = TensorProto.FLOAT
    return g.model([helper.make_tensor_value_info("hidden", f, [1, "tokens", dims["hidden"]])],
                   [helper.make_tensor_value_info("logits", f, [1, "tokens", vocab])])


def build_tokenizer(path: Path, vocab: int) -> int:
    """A byte-level BPE tokenizer trained on a few standard-library files; its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in ("textwrap.py", "heapq.py", "bisect.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok.get_vocab_size()


def build_package(root: Path, shape: str, layers: int, seed: int = 0) -> Path:
    """Write the package (skipped when `root` already holds this shape's)."""
    from spac.ops.expert_graph import build_expert_graph, expert_tensors
    from spac.runtime.manifest import EXPERT_FILE_PATTERN, write_package_manifest

    s = SHAPES[shape]
    tag = f"gpu-check {shape} layers={layers} seed={seed}"
    manifest_path = root / "manifest.yaml"
    if manifest_path.is_file() and tag in manifest_path.read_text():
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    vocab = build_tokenizer(root / "tokenizer" / "tokenizer.json", s["vocab"])
    target = dict(hidden=s["hidden"], heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                  experts=s["experts"], top_k=s["top_k"])
    draft = dict(hidden=s["draft_hidden"], heads=s["draft_heads"], kv_heads=s["draft_kv_heads"],
                 head_dim=s["draft_head_dim"], intermediate=s["draft_intermediate"])

    def section(name: str, dims: dict, count: int, layer_graph, kind: str) -> dict:
        (root / name).mkdir(parents=True)
        (root / name / "embed.onnx").write_bytes(embed_graph(dims, vocab, rng).SerializeToString())
        (root / name / "head.onnx").write_bytes(head_graph(dims, vocab, rng).SerializeToString())
        entries = []
        kv = [1, dims["kv_heads"], 0, dims["head_dim"]]
        for index in range(count):
            file = f"{name}/layer_{index:03d}.onnx"
            (root / file).write_bytes(layer_graph(dims, rng).SerializeToString())
            entries.append({"index": index, "kind": kind, "file": file, "sliding_window": None,
                            "kv_shapes": [kv, list(kv)]})
        return {"dims": {"hidden_size": dims["hidden"], "vocab_size": vocab, "num_layers": count,
                         "max_position_embeddings": MAX_POSITIONS},
                "embed": f"{name}/embed.onnx", "head": f"{name}/head.onnx", "layers": entries}

    tgt = section("target", target, layers, moe_layer_graph, "moe")
    tgt.update(architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe")
    tgt["dims"].update(num_experts=s["experts"], top_k=s["top_k"], expert_intermediate_size=s["expert_intermediate"])
    drf = section("draft", draft, s["draft_layers"], dense_layer_graph, "dense")
    drf.update(architecture="Qwen3ForCausalLM", model_type="qwen3")

    # Experts: slices of one random pool at random offsets (distinct, and cheap to make).
    spec = {"variant": "swiglu"}
    tensors = expert_tensors("swiglu", s["hidden"], s["expert_intermediate"], "float32")
    floats = sum(t.nbytes for t in tensors) // 4
    pool = (rng.standard_normal(floats + (1 << 20), np.float32) * 0.02)
    pattern = EXPERT_FILE_PATTERN
    stub = build_expert_graph(spec, s["hidden"], s["expert_intermediate"], "float32", data_file="DATA")
    for layer in range(layers):
        (root / pattern.format(layer=layer, expert=0)).parent.mkdir(parents=True)
        for expert in range(s["experts"]):
            base = root / pattern.format(layer=layer, expert=expert)
            offset = int(rng.integers(0, 1 << 20))
            base.with_suffix(".data").write_bytes(pool[offset:offset + floats].tobytes())
            for t in stub.graph.initializer:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = base.name + ".data"
            base.with_suffix(".onnx").write_bytes(stub.SerializeToString())
    tgt["experts"] = {"spec": spec, "tensors": [t.manifest_entry() for t in tensors],
                      "bytes_per_expert": sum(t.nbytes for t in tensors), "file_pattern": pattern}
    tokenizer = {"files": ["tokenizer/tokenizer.json"], "eos_token_ids": [], "bos_token_id": None,
                 "chat_template": None, "bos_token": None, "eos_token": None}
    write_package_manifest(root, {"model": tag, "draft": tag}, "float32", tokenizer, tgt, drf)
    return root


# =============================================================================================
# 3-4. Runs


class ScriptedDraft:
    """The package's draft runner (run for its cost) whose proposal is replaced: the reference
    continuation's token with probability `p` per position, else a wrong one. Fixed per position
    by a seed, so every SD run sees the same acceptance pattern."""

    def __init__(self, runner, vocab: int, p: float, seed: int):
        self.runner, self.vocab, self.p, self.seed = runner, vocab, p, seed
        self.reference: list[int] = []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    @property
    def length(self) -> int:
        return self.runner.length

    def forward(self, tokens):
        logits = self.runner.forward(tokens)
        position = self.runner.length  # the sequence index of the token this proposes
        want = self.reference[position] if position < len(self.reference) else 0
        coin = np.random.default_rng([self.seed, position]).random()
        token = want if coin < self.p else (want + 1) % self.vocab
        out = np.zeros_like(logits)
        out[-1, token] = 1.0
        return out

    def truncate(self, length: int) -> None:
        self.runner.truncate(length)

    def reset(self) -> None:
        self.runner.reset()


def device_runtime(package: Path, profile_path: Path, kernel_provider: str, args, **kwargs):
    """A Runtime whose experts go through the device tier (DeviceSlots + Balancer) with the slots'
    kernel on `kernel_provider`: the real CUDA path when it is "cuda", else the same code with
    the slots on the CPU EP (as tests/test_device_tier.py does)."""
    from spac.runtime import Runtime

    if kernel_provider == "cuda":
        return Runtime(package, profile=str(profile_path), providers=["cuda"], strict=True, draft_len=args.draft_len,
                       threads=args.threads, host_budget=1.0, **kwargs)

    return Runtime(package, profile=str(profile_path), providers=["cpu"], draft_len=args.draft_len,
                   threads=args.threads, host_budget=1.0, device_tier="cpu", **kwargs)


def warm_host(experts) -> float:
    """Read every expert into the host tier (not counted): the device mode isolates host → device."""
    started = time.perf_counter()
    for layer in experts.moe_layers:
        for expert in range(experts.num_experts):
            if (layer, expert) not in experts.host.slots:
                experts._admit((layer, expert), experts._read(layer, expert))
    experts.reset_stats()
    return time.perf_counter() - started


def one_run(make_runtime, prompts: list[str], speculative: bool, args, references=None, warm=False) -> dict:
    started = time.perf_counter()
    with make_runtime() as runtime:
        load_seconds = time.perf_counter() - started
        warm_seconds = warm_host(runtime.experts) if warm else 0.0
        draft = None
        if speculative:
            draft = runtime.draft = ScriptedDraft(runtime.draft, runtime.manifest.target.dims["vocab_size"],
                                                  args.acceptance, args.seed)
        runtime.generate(prompts[0][:40], max_new_tokens=4, speculative=speculative)  # ORT warm-up
        runtime.experts.routing_totals[:] = 0
        results = []
        for i, text in enumerate(prompts):
            if draft is not None:
                ids = runtime.tokenizer.encode_prompt(text)
                draft.reference = ids + references[i]
            results.append(runtime.generate(text, max_new_tokens=args.max_new_tokens, speculative=speculative))
        routing = runtime.experts.routing_totals.copy()
        has_device = runtime.experts.device is not None
    stats = reduce(add, (r.stats for r in results))
    paging, calls = stats.experts.paging, dict(stats.experts.calls)
    tiers = {name: getattr(paging, name) for name in ("device_hits", "device_fetches", "device_bytes_copied",
                                                      "host_hits", "host_misses", "storage_bytes_read")}
    lookups = paging.host_hits + paging.host_misses
    device_lookups = sum(calls.values()) if has_device else 0
    return {
        "tokens_per_second": stats.tokens_per_second,
        "acceptance_rate": stats.decode.acceptance_rate if stats.decode.proposed else None,
        "host_hit_rate": paging.host_hits / lookups if lookups else 1.0,
        "device_hit_rate": paging.device_hits / device_lookups if device_lookups else None,
        "expert_calls": calls, "decode_tokens": stats.decoded_tokens, "decode_seconds": stats.decode_seconds,
        "proposed": stats.decode.proposed, "accepted": stats.decode.accepted, "stall_seconds": paging.stall_seconds,
        **tiers, "prefetch": {"issued": paging.prefetch_issued, "used": paging.prefetch_used,
                              "dropped": paging.prefetch_dropped},
        "load_seconds": load_seconds, "warm_host_seconds": warm_seconds,
        "wall_seconds": time.perf_counter() - started, "token_ids": [r.token_ids for r in results],
        "routing": routing,
    }


def run_mode(mode: str, package: Path, args, env: dict, deadline: float, report) -> dict:
    """Every run of one mode; `report(partial)` is called after each run."""
    from spac.runtime import Runtime
    from spac.runtime.profile import load_profile, save_profile

    if mode == "host":  # cold storage paging of random routing: keep it short
        args = argparse.Namespace(**{**vars(args), "prompts": 1,
                                     "max_new_tokens": min(args.max_new_tokens, args.host_max_new_tokens)})
    prompts = list(function_openings(PROMPT_MODULES[:args.prompts]).values())
    out = {"runs": {}, "notes": [], "prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    if mode == "device":
        kernel = "cuda" if env["cuda_ep_runs"] else "cpu"
        base = load_profile("h100-budget")
        import dataclasses

        from spac.runtime.profile import Budget

        profile = dataclasses.replace(base, name="gpu-check", budgets={"device": Budget(fraction=args.device_budget),
                                                                       "host": Budget(fraction=1.0)})
        profile_path = Path(tempfile.mkdtemp(prefix="gpu-check-profile-")) / "gpu-check.yaml"
        save_profile(profile, profile_path)
        out.update(kernel_provider=kernel, device_budget=args.device_budget, host_budget=1.0, host_warm=True,
                   profile="h100-budget with the device budget above")
        if kernel != "cuda":
            out["notes"].append("NO CUDA EP: the device slots ran on the CPU EP; this exercises the device-tier "
                                "code path (DeviceSlots, balancer plans) and its counts, not GPU timings")

        def factory(**kwargs):
            return lambda: device_runtime(package, profile_path, kernel, args, **kwargs)
        warm = True
    else:
        out.update(kernel_provider="cpu", host_budget=args.host_budget, host_warm=False, profile="cpu-only")

        def factory(**kwargs):
            return lambda: Runtime(package, profile="cpu-only", draft_len=args.draft_len, threads=args.threads,
                                   host_budget=args.host_budget, **kwargs)
        warm = False

    references, frequencies, expected = None, None, None
    for name, speculative, policy, estimator in CONFIGS:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (expected is not None and remaining < 1.5 * expected):
            out["notes"].append(f"skipped {name} and later runs: {remaining:.0f} s left of the time budget")
            break
        kwargs = dict(policy=policy)
        if estimator:
            kwargs["estimator"] = estimator
        if policy == "static":
            kwargs["static_frequencies"] = frequencies
        try:
            r = one_run(factory(**kwargs), prompts, speculative, args, references, warm)
        except Exception as error:  # noqa: BLE001 - a failed run is a finding, the others still run
            out["runs"][name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            print(f"  {mode:<7}{name:<26} FAILED: {error}", flush=True)
            report(out)
            continue
        expected = max(expected or 0.0, r["wall_seconds"])
        if references is None:
            references, frequencies = r["token_ids"], r["routing"]
        r["lossless"] = r.pop("token_ids") == references
        r.pop("routing")
        out["runs"][name] = r
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        device = "-" if r["device_hit_rate"] is None else f"{r['device_hit_rate']:.0%}"
        print(f"  {mode:<7}{name:<26}{r['tokens_per_second']:>8.2f} tok/s  accept {accept:>4}  calls {r['expert_calls']}"
              f"  device hits {device}  H2D {r['device_bytes_copied'] / 1e9:.2f} GB  host hit {r['host_hit_rate']:.0%}"
              f"  read {r['storage_bytes_read'] / 1e9:.2f} GB  stall {r['stall_seconds']:.2f} s"
              f"  [{r['wall_seconds']:.0f} s]", flush=True)
        report(out)
    runs = out["runs"]
    ok = {k: v for k, v in runs.items() if "error" not in v}
    ratios = {}
    for name in SPAC:
        if name in ok:
            for base in ("static+SD", "lru"):
                if base in ok and ok[base]["tokens_per_second"]:
                    ratios[f"{name} / {base}"] = ok[name]["tokens_per_second"] / ok[base]["tokens_per_second"]
    out["ratios"] = ratios
    out["lossless"] = all(v.get("lossless", False) for v in ok.values())
    return out


# =============================================================================================
# 5. torch: the link and one expert on the GPU


def torch_figures(shape: str) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no GPU"}
    s = SHAPES[shape]
    h, i = s["hidden"], s["expert_intermediate"]
    out = {"device": torch.cuda.get_device_name(0)}
    for dtype in (torch.float32, torch.bfloat16):
        size = 3 * h * i * torch.tensor([], dtype=dtype).element_size()
        for pinned in (False, True):
            host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
            dev = torch.empty(size, dtype=torch.uint8, device="cuda")
            for _ in range(3):
                dev.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(20):
                dev.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - began) / 20
            out[f"h2d_{str(dtype).split('.')[-1]}_{'pinned' if pinned else 'pageable'}"] = {
                "expert_bytes": size, "ms": seconds * 1e3, "gbps": size / seconds / 1e9}
        w1 = torch.randn(h, 2 * i, device="cuda", dtype=dtype) * 0.02
        w2 = torch.randn(i, h, device="cuda", dtype=dtype) * 0.02
        for tokens in (1, 5, 40):
            x = torch.randn(tokens, h, device="cuda", dtype=dtype)

            def expert():
                gate, up = (x @ w1).chunk(2, dim=-1)
                return (torch.nn.functional.silu(gate) * up) @ w2

            for _ in range(5):
                expert()
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(50):
                expert()
            torch.cuda.synchronize()
            out[f"expert_{str(dtype).split('.')[-1]}_{tokens}tok_ms"] = (time.perf_counter() - began) / 50 * 1e3
    return out


# =============================================================================================


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_budget
    results = {"command": [Path(sys.executable).name, *sys.argv], "shape": args.shape, "layers": args.layers,
               "dry_run": args.dry_run, "settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
               "notes": ["random weights: routing is almost i.i.d. across tokens; the draft is scripted "
                         f"(P(right) = {args.acceptance} per token); float32 package; the trunk runs on the CPU EP "
                         "(the runtime places only experts on the CUDA EP)"],
               "stages": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["seconds"] = time.monotonic() - started
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(args.out)

    status = 0
    try:
        env = results["environment"] = environment()
        save()
        workdir = args.workdir or Path(tempfile.gettempdir()) / "spac-gpu-check"
        package = workdir / f"package-{args.shape}-{args.layers}"
        began = time.monotonic()
        build_package(package, args.shape, args.layers, args.seed)
        from spac.runtime.manifest import load_manifest

        manifest = load_manifest(package)
        results["package"] = {"path": str(package), "build_seconds": time.monotonic() - began,
                              "bytes_per_expert": manifest.target.experts.bytes_per_expert,
                              "expert_bytes_total": manifest.expert_bytes_total(),
                              "trunk_bytes": manifest.trunk_bytes(), "dims": manifest.target.dims}
        print(f"package: {args.shape} × {args.layers} MoE layers, {manifest.target.experts.bytes_per_expert / 1e6:.1f} MB"
              f" per expert, {manifest.expert_bytes_total() / 1e9:.2f} GB of experts, built in "
              f"{results['package']['build_seconds']:.0f} s", flush=True)
        save()
        os.sync()
        modes = [m for m in args.modes if m in ("device", "host")]
        if not env["cuda_ep_runs"]:
            modes = sorted(modes, key=lambda m: m != "host")  # without a GPU the CPU comparison matters more
        want_torch = "torch" in args.modes or (env.get("torch_cuda") and not args.dry_run)
        run_deadline = deadline - (30 if want_torch else 0)  # keep time for the torch figures
        for mode in modes:
            def report(partial, mode=mode):
                results["stages"][mode] = partial
                save()
            results["stages"][mode] = run_mode(mode, package, args, env, run_deadline, report)
            save()
            ratios = results["stages"][mode]["ratios"]
            print(f"  {mode} ratios (tokens/s, measured): " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()),
                  flush=True)
        if want_torch:
            try:
                results["stages"]["torch"] = torch_figures(args.shape)
            except Exception as error:  # noqa: BLE001
                results["stages"]["torch"] = {"error": str(error)}
            print(f"  torch: {results['stages']['torch']}", flush=True)
        failed = [f"{m}/{n}" for m, st in results["stages"].items() if isinstance(st, dict)
                  for n, r in st.get("runs", {}).items() if "error" in r]
        lossless = all(st.get("lossless", True) for st in results["stages"].values() if isinstance(st, dict))
        results["ok"] = not failed and lossless
        status = 0 if results["ok"] else 1
    except KeyboardInterrupt:
        results["interrupted"] = "stopped by the time limit (SIGINT); the stages above are what finished"
        status = 2
    except Exception as error:  # noqa: BLE001
        results["error"] = f"{type(error).__name__}: {error}"
        results["traceback"] = traceback.format_exc()
        print(results["traceback"], file=sys.stderr)
        status = 1
    save()
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
