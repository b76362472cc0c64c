#!/usr/bin/env python3
"""Self-speculative decoding against the draft model and against no speculative decoding, on
the trained model, at several host budgets, interleaved in one run.

    python scripts/bench_self_speculative.py [--budgets 0.17 0.25 0.45 1.0] [--repeats 2]
                                             [--max-new-tokens 48] [--memory-cap 0.75]
                                             [--out results/bench_self_speculative.json]

Contenders, each in a fresh Runtime per budget and repeat (the order rotates every repeat, so
all of them see the same machine):
  no SD             the target alone (`lru` and `spac`; the better one is the baseline)
  draft SD          the trained dense draft proposes γ tokens (`spac`)
  self SD           the target drafts with the experts it holds, substituting a missing one by
                    the next-best held expert (`spac`, which prefetches the draft's lookahead)
  self SD (drop)    the same, leaving a missing expert out instead of substituting it
  self SD (copies)  the target drafting from int4 copies of every expert, held beside the host
                    cache (a second export with spac-export --draft-experts int4; `spac`)
  ... γ8            the same at the profile's self_draft_len (8) instead of --draft-len
  ... c0.5          draft or self SD whose rounds stop drafting after a token the draft gave
                    less than 50 % (Runtime(min_draft_confidence=0.5))
At 100 % every expert is resident (no pager): the policy does not matter there.

With --memory-cap every run is a fresh process inside a real memory cap (a cgroup-v1 group,
scripts/memory_cap.py; root only) of that share of the package's bytes, as bench_memory.py's
--caps, after the page cache is dropped. The host budget stays the one --budgets gives, so every
contender caches the same experts and the cap must hold the largest of them (self SD holds its
draft copies too); the run's peak memory and OOM kills are reported. bench_memory.py instead
sizes each run's cache to fill the cap (--memory-limit auto).

Reports decode tokens/s, acceptance, the draft's substitution rate, draft and verify ms per
round, and the ratios self/no-SD and self/draft per budget; every run must give the same greedy
tokens. Storage reads go to the disk (see scripts/bench_paging.py: O_DIRECT).

Model: the Qwen3-MoE and draft trained by scripts/train_small_moe.py (--trained), exported with
its draft into --packages (once plain, once with int4 draft copies of its experts) unless a
current export is already there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import memory_cap  # noqa: E402  (sibling scripts, not a package)
from bench_memory import model_bytes  # noqa: E402
from bench_paging import PAGE_CACHE, REPO, TRAINED, export  # noqa: E402
from spac.bench.prompts import PAGING_MODULES, function_openings, warmup_prompt  # noqa: E402
from spac.runtime.profile import SELF_DRAFT_LEN  # noqa: E402

COPIES = "self SD (copies)"  # runs on the package with draft copies of its experts
COPIES_SELF_LEN = f"{COPIES} γ{SELF_DRAFT_LEN}"  # the same at the profile's self_draft_len
CONFIDENCE = 0.5  # the adaptive contenders stop drafting after a token the draft gave less than this
# name -> Runtime options; "policy" None means the budget's default (resident at 100 %)
CONTENDERS = {
    "no SD (lru)": dict(draft="none", policy="lru"),
    "no SD (spac)": dict(draft="none", policy="spac"),
    "draft SD": dict(draft="model", policy="spac"),
    f"draft SD c{CONFIDENCE}": dict(draft="model", policy="spac", min_draft_confidence=CONFIDENCE),
    "self SD": dict(draft="self", policy="spac"),
    f"self SD c{CONFIDENCE}": dict(draft="self", policy="spac", min_draft_confidence=CONFIDENCE),
    "self SD (drop)": dict(draft="self", policy="spac", substitute=False),
    COPIES: dict(draft="self", policy="spac"),
    COPIES_SELF_LEN: dict(draft="self", policy="spac", draft_len=None),  # None: the profile's self_draft_len
}
PROMPT_COUNT = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.17, 0.25, 0.45, 1.0],
                   help="host budgets, fractions of the expert bytes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--draft-len", type=int, default=4, help="γ")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--trained", type=Path, default=TRAINED, help="folder with small-moe/ and small-draft/")
    p.add_argument("--packages", type=Path, default=REPO / "cache" / "packages", help="where the export goes")
    p.add_argument("--memory-cap", type=float, metavar="FRACTION",
                   help="run each contender inside a memory cap of this share of the package's bytes (root)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_self_speculative.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run inside the cap
    return p.parse_args(argv)


def run(packages: dict, texts: list[str], warmup: str, args, budget: float, name: str) -> dict:
    """One contender at one budget in a fresh Runtime (the copies' contender on the package with
    draft copies): totals over the prompts."""
    from spac.runtime import Runtime

    options = dict(CONTENDERS[name])
    substitute = options.pop("substitute", True)
    if budget >= 1.0:
        options.pop("policy")
    runtime_args = dict(host_budget=budget) if budget < 1.0 else {}
    package = packages["copies" if name.startswith(COPIES) else "plain"]
    draft_len = options.pop("draft_len", args.draft_len)
    with Runtime(package, draft_len=draft_len, threads=args.threads, **options, **runtime_args) as runtime:
        if runtime.draft_mode == "self":
            runtime.draft.experts.substitute = substitute
        runtime.generate(warmup, max_new_tokens=8)  # ORT warm-up, first reads
        total, tokens = None, []
        for text in texts:
            result = runtime.generate(text, max_new_tokens=args.max_new_tokens)
            total = result.stats if total is None else total + result.stats
            tokens.append(result.token_ids)
    flat = total.as_dict()
    return {"tokens_per_second": total.tokens_per_second, "acceptance_rate": flat["acceptance_rate"],
            "substitution_rate": flat["draft_substitution_rate"], "hit_rate": flat["expert_hit_rate"],
            "draft_ms_per_round": flat["draft_seconds_per_round"] * 1000,
            "verify_ms_per_round": flat["verify_seconds_per_round"] * 1000,
            "mean_accepted_per_round": flat["mean_accepted_per_round"], "bytes_paged": flat["bytes_paged"],
            "prefetch": flat.get("prefetch"), "token_ids": tokens}


def run_capped(cap: int, packages: dict, texts: list[str], warmup: str, args, budget: float, name: str) -> dict:
    """`run` in a fresh process inside a memory cap of `cap` bytes, the page cache dropped first."""
    config = {"packages": {kind: str(path) for kind, path in packages.items()}, "texts": texts, "warmup": warmup,
              "budget": budget, "name": name,
              "args": {key: getattr(args, key) for key in ("draft_len", "threads", "max_new_tokens")}}
    result = memory_cap.run_worker(Path(__file__).resolve(), config, cap)
    if "failed" in result:
        raise SystemExit(f"error: {name} at a {budget:.0%} host budget failed inside the {cap / 1e6:.0f} MB cap "
                         f"({result['failed']}); give a larger --memory-cap")
    return result


def worker(config: dict) -> dict:
    """The capped process's side of run_capped."""
    packages = {kind: Path(path) for kind, path in config["packages"].items()}
    return run(packages, config["texts"], config["warmup"], argparse.Namespace(**config["args"]),
               config["budget"], config["name"])


def median_runs(repeats: list[dict]) -> dict:
    """The median of each number over the repeats (token ids from the first)."""
    merged = dict(repeats[0])
    for key, value in repeats[0].items():
        if isinstance(value, float):
            merged[key] = float(np.median([r[key] for r in repeats]))
    merged["tokens_per_second_each"] = [r["tokens_per_second"] for r in repeats]
    if "peak_bytes" in merged:  # run inside a cap: every repeat's peak, and every OOM kill
        merged["peak_bytes_each"] = [r["peak_bytes"] for r in repeats]
        merged["oom_kills"] = sum(r["oom_kills"] for r in repeats)
    return merged


def ratios(runs: dict) -> dict:
    no_sd = max(runs["no SD (lru)"]["tokens_per_second"], runs["no SD (spac)"]["tokens_per_second"])
    out = {}
    for name in CONTENDERS:
        if not name.startswith("no SD"):
            out[f"{name}/no SD"] = runs[name]["tokens_per_second"] / no_sd
    best = {kind: max(r["tokens_per_second"] for name, r in runs.items() if name.startswith(kind))
            for kind in ("self SD", "draft SD")}
    out["best self SD/best draft SD"] = best["self SD"] / best["draft SD"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.memory_cap is not None and memory_cap.available():
        raise SystemExit(f"error: cannot cap memory here: {memory_cap.available()}")
    model, draft = args.trained / "small-moe", args.trained / "small-draft"
    if not (model / "config.json").exists() or not (draft / "config.json").exists():
        raise SystemExit(f"no trained model in {args.trained} (run scripts/train_small_moe.py)")
    packages = {"plain": export(model, draft, args.packages / "small-moe"),
                "copies": export(model, draft, args.packages / "small-moe-copies", "--draft-experts", "int4")}
    os.sync()  # DONTNEED cannot drop dirty pages: flush what the export just wrote
    cap = None
    if args.memory_cap is not None:
        from spac.runtime.manifest import load_manifest

        cap = int(args.memory_cap * model_bytes(load_manifest(packages["plain"])))
    warmup = warmup_prompt()
    texts = list(function_openings(PAGING_MODULES).values())[:PROMPT_COUNT]
    print(f"packages: {', '.join(map(str, packages.values()))}; {PROMPT_COUNT} prompts × {args.max_new_tokens} "
          f"tokens, γ = {args.draft_len}, "
          f"{args.threads} threads, {args.repeats} repeats, load average {os.getloadavg()[0]:.1f}")
    print(f"storage reads: {PAGE_CACHE}")
    print(f"memory cap: {cap / 1e6:.0f} MB ({args.memory_cap:.0%} of the package), a fresh process per run, "
          "page cache dropped\n" if cap else "memory cap: none\n")

    measured = {budget: {name: [] for name in CONTENDERS} for budget in args.budgets}
    started = time.perf_counter()
    names = list(CONTENDERS)
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for budget in args.budgets:
            for name in order:
                measured[budget][name].append(run(packages, texts, warmup, args, budget, name) if cap is None else
                                              run_capped(cap, packages, texts, warmup, args, budget, name))
    results = {budget: {name: median_runs(reps) for name, reps in runs.items()} for budget, runs in measured.items()}

    lossless = True
    print(f"{'budget':<8}{'run':<18}{'tok/s':>8}{'accept':>8}{'subst':>7}{'hit':>7}{'draft ms':>10}{'verify ms':>11}"
          + (f"{'peak MB':>9}" if cap else ""))
    for budget, runs in results.items():
        reference = runs["no SD (lru)"]["token_ids"]
        lossless &= all(r["token_ids"] == reference for r in runs.values())
        for name, r in runs.items():
            sd = not name.startswith("no SD")
            print(f"{budget:<8.0%}{name:<18}{r['tokens_per_second']:>8.1f}{_pct(r['acceptance_rate'], sd):>8}"
                  f"{_pct(r['substitution_rate'], name.startswith('self')):>7}{r['hit_rate']:>7.0%}"
                  f"{r['draft_ms_per_round']:>10.2f}{r['verify_ms_per_round']:>11.2f}"
                  + (f"{max(r['peak_bytes_each']) / 1e6:>9.0f}" if cap else ""))
        print("        " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios(runs).items()))
    print(f"every run produced the same greedy tokens: {'yes' if lossless else 'NO'}; "
          f"{time.perf_counter() - started:.0f} s")

    report = {
        "packages": {kind: str(path) for kind, path in packages.items()}, "prompts": PROMPT_COUNT,
        "max_new_tokens": args.max_new_tokens,
        "draft_len": args.draft_len, "threads": args.threads, "repeats": args.repeats, "page_cache": PAGE_CACHE,
        "load_average": os.getloadavg()[0], "memory_cap_bytes": cap, "contenders": {k: {**v} for k, v in CONTENDERS.items()},
        "budgets": {f"{budget:.0%}": {"runs": {name: {k: v for k, v in r.items() if k != "token_ids"}
                                               for name, r in runs.items()}, "ratios": ratios(runs)}
                    for budget, runs in results.items()},
        "lossless": lossless,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if lossless else 1


def _pct(value, shown: bool) -> str:
    return f"{value:.0%}" if shown else "-"


if __name__ == "__main__":
    sys.exit(main())
