#!/usr/bin/env python3
"""Expert paging benchmark on the CPU: the storage → host tier with the host budget at 17 % of
the expert bytes (the paper's setting), every policy on the same package and prompts, in one run.

    python scripts/bench_paging.py [--budget 0.17] [--max-new-tokens 64] [--out results/bench_paging.json]

Runs, each in a fresh Runtime:
  resident          every expert in RAM, with SD: the ceiling, and the calibration pass whose
                    routing counts choose `static`'s resident set (the same prompts: an oracle)
  lru               on-demand fetch with LRU eviction, without SD (the MixtralOffload analogue)
  static+SD         the most frequently routed experts resident, misses computed from storage
                    (the llama.cpp `-ot` / Fiddler analogue)
  spac+SD           utility-driven prefetch and eviction, once per estimator: spac-counter (the
                    published counter) and decayed (ours)

Reports decode tokens/s, hit rate, bytes read, seconds stalled on storage, prefetch counts, and
the ratios spac/static and spac/lru (goal: ≥ 1.42 and ≥ 4). Every run must produce the same
greedy tokens; the script says whether they did.

Storage reads are the runtime's default: whole-file O_DIRECT reads past the page cache
(spac.ops.direct_io; where the file system refuses O_DIRECT, preads followed by
posix_fadvise(POSIX_FADV_DONTNEED)), after an os.sync() so that freshly written files are clean:
the OS page cache cannot act as an unbudgeted RAM tier.

Model: the Qwen3-MoE trained on the standard library (cache/trained/small-moe + small-draft,
made by scripts/train_small_moe.py) when it exists, exported into cache/packages/; otherwise a
random-weight model of the same shape (whose routing is almost i.i.d. and whose draft is never
accepted: the output says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from spac.bench.measure import PAGE_CACHE, generate_all
from spac.bench.prompts import PAGING_MODULES, function_openings, warmup_prompt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

TRAINED = REPO / "cache" / "trained"
PACKAGES = REPO / "cache" / "packages"
# The trained model's shape (scripts/train_small_moe.py defaults), for the random fallback.
RANDOM_SHAPE = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=32, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256,
                    intermediate_size=768)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.17, help="host budget, a fraction of the expert bytes")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-len", type=int, default=4, help="γ for the SD runs")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_paging.json")
    return p.parse_args(argv)


def export(model: Path, draft: Path, package: Path, *flags: str) -> Path:
    """spac-export into `package` (with more spac-export `flags`) unless a package newer than both
    models is already there."""
    from spac.export.cli import main as export_main

    newest = max(f.stat().st_mtime for d in (model, draft) for f in d.iterdir())
    manifest = package / "manifest.yaml"
    if not manifest.exists() or manifest.stat().st_mtime < newest:
        package.parent.mkdir(parents=True, exist_ok=True)
        if export_main([str(model), "--draft", str(draft), "-o", str(package), "--force", "--quiet", *flags]):
            raise SystemExit(f"spac-export of {model} failed")
    return package


def model_package() -> tuple[Path, str]:
    """(package, description): the trained pair if it exists, else a random-weight one."""
    model, draft = TRAINED / "small-moe", TRAINED / "small-draft"
    if (model / "config.json").exists() and (draft / "config.json").exists():
        return export(model, draft, PACKAGES / "small-moe"), f"trained on the standard library ({model}, {draft})"
    import make_models

    root = PACKAGES / "random-small-moe"
    model, draft = root / "model", root / "draft"
    if not (model / "config.json").exists():
        make_models.make_model("qwen3_moe", model, **RANDOM_SHAPE)
        make_models.make_model("qwen3", draft)
    description = ("RANDOM WEIGHTS (no trained model in cache/trained yet): routing is almost i.i.d. and the "
                   "draft is never accepted, so these numbers say little about the policies")
    return export(model, draft, root / "package"), description


def run(package: Path, texts: list[str], warmup: str, args, speculative: bool, routing_counts=None,
        **runtime_args) -> dict:
    """One configuration in a fresh Runtime; `routing_counts[layer, expert]` (if given) counts the
    target's routing over the measured prompts."""
    from spac.runtime import Runtime

    with Runtime(package, draft_len=args.draft_len, threads=args.threads, **runtime_args) as runtime:
        runtime.generate(warmup, max_new_tokens=8, speculative=speculative)  # ORT warm-up, first reads
        counts = runtime.count_routing() if routing_counts is not None else None
        result = generate_all(runtime, texts, speculative, args.max_new_tokens)
        if counts is not None:
            routing_counts += counts.counts
        return result


def main(argv=None) -> int:
    args = parse_args(argv)
    package, description = model_package()
    os.sync()  # DONTNEED cannot drop dirty pages: flush what the export just wrote
    from spac.runtime.manifest import load_manifest

    manifest = load_manifest(package)
    moe = manifest.target
    total, per_expert = manifest.expert_bytes_total(), moe.experts.bytes_per_expert
    budget = int(args.budget * total)
    found = function_openings(PAGING_MODULES)
    warmup = warmup_prompt()
    texts = list(found.values())
    print(f"model: {description}")
    print(f"package: {package}: {len(moe.moe_layers)} MoE layers × {moe.dims['num_experts']} experts, top-"
          f"{moe.dims['top_k']}, {per_expert / 1e6:.2f} MB per expert, {total / 1e6:.1f} MB in all")
    print(f"host budget: {args.budget:.0%} of the expert bytes = {budget / 1e6:.1f} MB = {budget // per_expert} slots")
    print(f"storage reads: {PAGE_CACHE}")
    print(f"{len(texts)} prompts (standard-library functions: {', '.join(found)}), {args.max_new_tokens} new "
          f"tokens each, γ = {args.draft_len}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}\n")

    frequencies = np.zeros((moe.dims["num_layers"], moe.dims["num_experts"]), dtype=np.int64)
    runs = {"resident+SD": run(package, texts, warmup, args, True, routing_counts=frequencies)}
    paged = dict(host_budget=budget)
    runs["lru"] = run(package, texts, warmup, args, False, policy="lru", **paged)
    runs["static+SD"] = run(package, texts, warmup, args, True, policy="static", static_frequencies=frequencies,
                            **paged)
    for estimator in ("spac-counter", "decayed"):
        runs[f"spac+SD ({estimator})"] = run(package, texts, warmup, args, True, policy="spac", estimator=estimator,
                                             **paged)

    reference = runs["resident+SD"]["token_ids"]
    lossless = all(r["token_ids"] == reference for r in runs.values())
    print(f"{'run':<24}{'tok/s':>8}{'hit rate':>10}{'MB read':>10}{'stall s':>9}{'prefetch i/u/d':>17}{'accept':>8}")
    for name, r in runs.items():
        prefetch = f"{r['issued']}/{r['used']}/{r['dropped']}"
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        print(f"{name:<24}{r['tokens_per_second']:>8.1f}{r['hit_rate']:>10.1%}{r['bytes_read'] / 1e6:>10.1f}"
              f"{r['stall_seconds']:>9.2f}{prefetch:>17}{accept:>8}")
    ratios = {}
    for estimator in ("spac-counter", "decayed"):
        speed = runs[f"spac+SD ({estimator})"]["tokens_per_second"]
        ratios[f"spac({estimator})/static+SD"] = speed / runs["static+SD"]["tokens_per_second"]
        ratios[f"spac({estimator})/lru"] = speed / runs["lru"]["tokens_per_second"]
    print()
    for name, value in ratios.items():
        print(f"{name:<30}{value:.2f}×")
    print("goal: spac/static+SD ≥ 1.42×, spac/lru ≥ 4×")
    print(f"every run produced the same greedy tokens: {'yes' if lossless else 'NO'}")

    report = {
        "model": {"description": description, "package": str(package), "moe_layers": len(moe.moe_layers),
                  "experts_per_layer": moe.dims["num_experts"], "top_k": moe.dims["top_k"],
                  "bytes_per_expert": per_expert, "expert_bytes_total": total},
        "settings": {"host_budget_fraction": args.budget, "host_budget_bytes": budget,
                     "slots": budget // per_expert, "draft_len": args.draft_len,
                     "max_new_tokens": args.max_new_tokens, "threads": args.threads, "prompts": list(found),
                     "page_cache": PAGE_CACHE, "load_average": os.getloadavg()[0]},
        "runs": {name: {k: v for k, v in r.items() if k != "token_ids"}
                 for name, r in runs.items()},
        "ratios": ratios,
        "goal": {"spac/static+SD": 1.42, "spac/lru": 4.0},
        "lossless": lossless,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
