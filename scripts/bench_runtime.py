#!/usr/bin/env python3
"""Decode speed of the spac Runtime (CPU EP, no speculative decoding, every expert resident)
against transformers' eager `generate` on the same model, measured in one run.

    python scripts/bench_runtime.py [--threads 2] [--tokens 64] [--thread-pool global|per-session]
                                    [--out results/bench_runtime.json]
    python scripts/bench_runtime.py --quick    # 32 tokens, 3 rounds

The model is a random-weight Qwen3-MoE big enough that kernels dominate (hidden 1024, 8 layers,
32 experts, top-4), built and exported once into --work (cached). Prints the ratio and a
breakdown of where the runtime's time goes (ORT trunk, ORT experts, Python orchestration).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_experts=32, num_experts_per_tok=4,
             moe_intermediate_size=512, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=2048)


def exporter_digest() -> str:
    """A digest of the exporter's code: a cached package made by other code is made again."""
    import hashlib

    import spac.export
    from spac.ops import expert_graph

    digest = hashlib.sha256()
    for file in sorted(Path(spac.export.__file__).parent.glob("*.py")) + [Path(expert_graph.__file__)]:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def build_package(work: Path, *export_flags: str, shape: dict = SHAPE) -> tuple[Path, Path]:
    """(model_dir, package): the model of `shape` built once under `work`, exported with
    `export_flags` (e.g. "--experts", "int4"); cached per flags and exporter code."""
    import shutil

    import make_models
    from spac.export.cli import main as export_main

    model_dir, draft_dir = work / "model", work / "draft"
    tag = "-".join(flag.lstrip("-") for flag in export_flags) or "float"
    package = work / f"package-{tag}-{exporter_digest()}"
    if not (model_dir / "config.json").exists():
        make_models.make_model("qwen3_moe", model_dir, **shape)
        make_models.make_model("qwen3", draft_dir)
    if not (package / "manifest.yaml").exists():
        for stale in work.glob(f"package-{tag}-*"):
            shutil.rmtree(stale)
        if export_main([str(model_dir), "--draft", str(draft_dir), "-o", str(package), "--quiet", *export_flags]):
            raise SystemExit("export failed")
    return model_dir, package


def transformers_rate(model_dir: Path, prompt: list[int], tokens: int, experts_implementation: str):
    """A function measuring transformers' decode tokens/s once: time generate(N) minus
    generate(1) (the prefill and first token)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation=experts_implementation,
                                                 attn_implementation="eager").eval()
    ids = torch.tensor([prompt])

    def decode_rate() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            return (tokens - 1) / (time.perf_counter() - start - first)

    return decode_rate


def runtime_rate(runtime, prompt: list[int], tokens: int):
    def decode_rate() -> float:
        # Random weights may emit EOS early: the stats count what was generated.
        return runtime.generate(prompt, max_new_tokens=tokens, speculative=False).stats.tokens_per_second

    return decode_rate


def matmul_roofline_rate(runtime, tokens: int, vocab: int):
    """ORT's ceiling on this machine: one session whose graph holds every weight matrix a decode
    step multiplies (the model's shapes, random values; the q/k/v projections side by side, as
    the exporter fuses them), run once per token. No orchestration of these kernels beats it, so
    spac's distance to it is what its Python, graph boundaries and small ops cost."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    hidden, inner, head = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["head_dim"]
    queries, kv = SHAPE["num_attention_heads"] * head, SHAPE["num_key_value_heads"] * head
    layer = [(hidden, queries + 2 * kv), (queries, hidden), (hidden, SHAPE["num_experts"])]
    layer += [(hidden, 2 * inner), (inner, hidden)] * SHAPE["num_experts_per_tok"]
    shapes = layer * SHAPE["num_hidden_layers"] + [(hidden, vocab)]
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for index, (rows, cols) in enumerate(shapes):
        weights.append(numpy_helper.from_array(rng.standard_normal((rows, cols), dtype=np.float32), f"w{index}"))
        nodes.append(helper.make_node("MatMul", [f"x{rows}", f"w{index}"], [f"y{index}"]))
    widths = sorted({rows for rows, _ in shapes})
    graph = helper.make_graph(
        nodes, "decode_step_matmuls",
        [helper.make_tensor_value_info(f"x{width}", TensorProto.FLOAT, [1, width]) for width in widths],
        [helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, None) for index in range(len(shapes))], weights)
    session = runtime.sessions.create(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
                                      .SerializeToString())
    feeds = {f"x{width}": rng.standard_normal((1, width), dtype=np.float32) for width in widths}

    def decode_rate() -> float:
        start = time.perf_counter()
        for _ in range(tokens):
            session.run(None, feeds)
        return tokens / (time.perf_counter() - start)

    return decode_rate


def interleaved_rates(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """Each contender's rate, measured round-robin so that all of them see the same machine
    (this VM's memory bandwidth moves by ±15% within minutes); each round starts with the next
    contender, since the order alone moved a ratio here (0.96x in one fixed order, 1.01x reversed)."""
    for measure in contenders.values():
        measure()  # warm-up
    rates = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            rates[name].append(contenders[name]())
    return rates


def profile_runtime(runtime, prompt: list[int], tokens: int) -> dict:
    profiler = cProfile.Profile()
    profiler.enable()
    runtime.generate(prompt, max_new_tokens=tokens, speculative=False)
    profiler.disable()
    return breakdown(profiler)


def breakdown(profiler: cProfile.Profile) -> dict:
    """Seconds in ORT runs of trunk graphs vs expert graphs vs everything else (Python, numpy)."""
    stats = pstats.Stats(profiler)
    total = max(entry[3] for entry in stats.stats.values())
    ort = {"expert": 0.0, "trunk": 0.0}
    for (file, _, name), (_, _, _, cumulative, callers) in stats.stats.items():
        if name == "run" and file.endswith("onnxruntime_inference_collection.py"):
            for (caller_file, _, caller_name), caller_stats in callers.items():
                kind = "expert" if caller_file.endswith("experts.py") else "trunk"
                ort[kind] += caller_stats[3]
    python = total - ort["expert"] - ort["trunk"]
    return {"total_s": total, "ort_trunk_s": ort["trunk"], "ort_experts_s": ort["expert"], "python_and_numpy_s": python}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("cache/bench_runtime"), help="model and package cache")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="rounds, each timing every contender once")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--thread-pool", choices=("global", "per-session"), default="global",
                        help="ORT thread pools of the Runtime, as spac-run's --thread-pool (default: global, "
                             "the spac-run command's)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_runtime.json"))
    parser.add_argument("--quick", action="store_true", help="a short run: --tokens 32 --repeats 3")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 32, 3
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, package = build_package(args.work)
    prompt = list(range(10, 26))

    import torch

    from spac.runtime import Runtime

    torch.set_num_threads(args.threads)
    runtime = Runtime(package, profile="cpu-only", threads=args.threads,
                      global_thread_pool=args.thread_pool == "global")
    # "eager" is the per-expert loop; transformers 5 defaults to "grouped_mm", slower on the CPU.
    rates = interleaved_rates({
        "spac": runtime_rate(runtime, prompt, args.tokens),
        "roofline": matmul_roofline_rate(runtime, args.tokens, runtime.manifest.target.dims["vocab_size"]),
        "eager": transformers_rate(model_dir, prompt, args.tokens, "eager"),
        "grouped_mm": transformers_rate(model_dir, prompt, args.tokens, "grouped_mm"),
    }, args.repeats)
    ours, theirs, default, roofline = (statistics.median(rates[name])
                                       for name in ("spac", "eager", "grouped_mm", "roofline"))
    round_ratios = [a / b for a, b in zip(rates["spac"], rates["eager"])]
    report = {"model": SHAPE, "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
              "thread_pool": args.thread_pool, "rates": rates,
              "runtime_tokens_per_second": ours, "transformers_eager_tokens_per_second": theirs,
              "transformers_grouped_mm_tokens_per_second": default,
              "ratio_vs_eager": ours / theirs, "ratio_vs_eager_per_round": round_ratios,
              "ratio_vs_grouped_mm": ours / default, "matmul_roofline_tokens_per_second": roofline,
              "share_of_roofline": ours / roofline, "roofline_vs_eager": roofline / theirs,
              "runtime_breakdown": profile_runtime(runtime, prompt, args.tokens)}
    print(json.dumps(report, indent=2))
    print(f"spac Runtime {ours:.1f} tok/s vs transformers eager {theirs:.1f} tok/s: {ours / theirs:.2f}x "
          f"(per round {min(round_ratios):.2f}-{max(round_ratios):.2f}x; vs transformers' default grouped_mm "
          f"experts {default:.1f} tok/s: {ours / default:.2f}x)")
    print(f"ORT matmul roofline {roofline:.1f} tok/s ({roofline / theirs:.2f}x transformers eager): spac reaches "
          f"{ours / roofline:.0%} of it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
