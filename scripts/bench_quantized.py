#!/usr/bin/env python3
"""Paged int4 expert calls against resident int4 expert calls, measured interleaved in one run.

    python scripts/bench_quantized.py [--threads 2] [--rounds 5] [--calls 200] [--out bench_quantized.json]

MatMulNBits is fast only on weights ONNX Runtime prepacks, which it does for initializers
alone, so the pager keeps each cached quantized expert as a session of its own with its weights
as initializers (spac.ops.experts.ExpertKernel.prepare). The contenders, one MoE layer's call
for one token (top-8 of 8 experts, Qwen3-30B-A3B's expert shape: hidden 2048, 768), int4 block 32:

  resident      ResidentExperts: a session per expert, loaded from the package
  paged         PagedExperts with every expert in its host cache (prepared sessions)
  as-inputs     the weights-as-inputs kernel the pager used before (one session, weights fed)

and the cost of preparing one expert (the session creation, on the prefetch worker or the
reader threads). Prints the ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_runtime import build_package  # noqa: E402

SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=8, num_experts_per_tok=8,
             num_hidden_layers=1)


def per_call(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="layer calls per contender and round")
    parser.add_argument("--work", type=Path, default=Path("bench-work/quantized"))
    parser.add_argument("--out", type=Path, default=Path("bench_quantized.json"))
    args = parser.parse_args(argv)
    from spac.ops.experts import ExpertKernel, ResidentExperts
    from spac.ops.pager import PagedExperts
    from spac.ops.sessions import SessionFactory
    from spac.ops.storage import ExpertFiles
    from spac.runtime.manifest import load_manifest

    args.work.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(build_package(args.work, "--experts", "int4", shape=SHAPE)[1])
    sessions = SessionFactory(args.threads)
    layer, experts = manifest.target.moe_layers[0], manifest.target.dims["num_experts"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, manifest.target.dims["hidden_size"])).astype(np.float32)
    ids = rng.permutation(experts)[None, : manifest.target.dims["top_k"]].astype(np.int64)
    weights = np.full(ids.shape, 1.0 / ids.shape[1], np.float32)

    resident = ResidentExperts(manifest, sessions)
    paged = PagedExperts(manifest, sessions, manifest.expert_bytes_total(), policy="lru")
    paged.run(layer, x, ids, weights)  # every routed expert read and prepared: all hits from now on
    raw = {expert: ExpertFiles(manifest).read(layer, expert) for expert in range(experts)}
    as_inputs = ExpertKernel(manifest, sessions, prepared=False)
    contenders = {
        "resident": lambda: resident.run(layer, x, ids, weights),
        "paged": lambda: paged.run(layer, x, ids, weights),
        "as-inputs": lambda: [as_inputs.run(x, raw[int(e)]) for e in ids[0]],
    }
    expected = contenders["resident"]()
    np.testing.assert_allclose(contenders["paged"](), expected, rtol=1e-5, atol=1e-6)
    times = {name: [] for name in contenders}
    prepare = []
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            fn()  # warm
            calls = max(1, args.calls // 20) if name == "as-inputs" else args.calls
            times[name].append(per_call(fn, calls))
        started = time.perf_counter()
        paged.kernel.prepare(raw[0])
        prepare.append(time.perf_counter() - started)
    paged.close()
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "shape": SHAPE, "threads": args.threads, "quantization": manifest.target.experts.quantization.as_dict(),
        "bytes_per_expert": manifest.target.experts.bytes_per_expert,
        "layer_call_ms": {name: [round(t * 1e3, 4) for t in values] for name, values in times.items()},
        "prepare_ms": [round(t * 1e3, 2) for t in prepare],
        "paged_speed_vs_resident": median["resident"] / median["paged"],
        "paged_speed_vs_resident_per_round": [r / p for r, p in zip(times["resident"], times["paged"])],
        "as_inputs_speed_vs_resident": median["resident"] / median["as-inputs"],
    }
    args.out.write_text(json.dumps(result, indent=2))
    for name, value in median.items():
        print(f"{name:10s} {value * 1e3:8.3f} ms per layer call (8 experts, 1 token)")
    print(f"prepare one expert (session creation): median {statistics.median(prepare) * 1e3:.1f} ms")
    print(f"paged / resident speed: {result['paged_speed_vs_resident']:.2f}x "
          f"(per round {', '.join(f'{r:.2f}' for r in result['paged_speed_vs_resident_per_round'])}); "
          f"weights as inputs: {result['as_inputs_speed_vs_resident']:.2f}x")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
