#!/usr/bin/env python3
"""Decode speed as the context grows: the KV cache appended in place (spac.runtime.kv_cache, the
default where a layer's attention is one GroupQueryAttention node) against the same runtime with
every layer copying its cache each step, measured round-robin in one process.

    python scripts/bench_kv_cache.py [--contexts 16,512,2048] [--tokens 32] [--repeats 3]
                                     [--precisions float32,int4] [--out results/bench_kv_cache.json]

The model is bench_runtime.py's random-weight Qwen3-MoE (hidden 1024, 8 layers, 32 experts,
top-4) with a 4,096-position context; float32 and `--experts int4 --trunk int4` packages, every
expert resident, CPU, 2 threads (the global pool), no speculative decoding. A context of N is a
prompt of N tokens, then --tokens tokens decoded: the decode tokens/s of each contender. The
copying contender is made by loading the package with the in-place rewrite switched off
(`in_place_graph` answering None), which is exactly the runtime before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_runtime import SHAPE, build_package, interleaved_rates, runtime_rate  # noqa: E402

LONG_SHAPE = {**SHAPE, "max_position_embeddings": 4096}
PRECISION_FLAGS = {"float32": (), "int4": ("--experts", "int4", "--trunk", "int4")}


def runtimes(package: Path, threads: int) -> dict:
    """{"in place": Runtime, "copying": Runtime} on `package`."""
    from spac.runtime import Runtime, model

    appending = Runtime(package, threads=threads, global_thread_pool=True)
    with mock.patch.object(model, "in_place_graph", lambda graph: None):
        copying = Runtime(package, threads=threads, global_thread_pool=True)
    assert appending.target.in_place and not copying.target.in_place, "no layer appends in place"
    return {"in place": appending, "copying": copying}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("cache/bench_kv_cache"), help="model and package cache")
    parser.add_argument("--contexts", default="16,512,2048", help="prompt lengths, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded after each prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="float32,int4", help=f"of {', '.join(PRECISION_FLAGS)}")
    parser.add_argument("--out", type=Path, default=Path("results/bench_kv_cache.json"))
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    if any(c < 1 or c + args.tokens > LONG_SHAPE["max_position_embeddings"] for c in contexts):
        parser.error(f"each context plus --tokens must lie in 1..{LONG_SHAPE['max_position_embeddings']}")
    precisions = args.precisions.split(",")
    if not set(precisions) <= set(PRECISION_FLAGS):
        parser.error(f"--precisions takes {', '.join(PRECISION_FLAGS)}, got {args.precisions}")
    args.work.mkdir(parents=True, exist_ok=True)

    # Every export first: its verification's sessions cannot share the global pool the runtimes use.
    packages = {precision: build_package(args.work, *PRECISION_FLAGS[precision], shape=LONG_SHAPE)[1]
                for precision in precisions}
    report = {"threads": args.threads, "tokens": args.tokens, "repeats": args.repeats, "results": {}}
    for precision, package in packages.items():
        contenders = runtimes(package, args.threads)
        for context in contexts:
            prompt = [10 + i % 400 for i in range(context)]
            rates = interleaved_rates({name: runtime_rate(runtime, prompt, args.tokens)
                                       for name, runtime in contenders.items()}, args.repeats)
            medians = {name: statistics.median(values) for name, values in rates.items()}
            per_round = [a / b for a, b in zip(rates["in place"], rates["copying"])]
            ratio = medians["in place"] / medians["copying"]
            report["results"][f"{precision} @ {context}"] = {"rates": rates, "median_tokens_per_second": medians,
                                                             "in place / copying": ratio, "per_round": per_round}
            print(f"{precision:8s} context {context:5d}: in place {medians['in place']:6.1f} tok/s, copying "
                  f"{medians['copying']:6.1f} tok/s: {ratio:.2f}x (per round {min(per_round):.2f}-{max(per_round):.2f}x)",
                  flush=True)
        for runtime in contenders.values():
            runtime.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
