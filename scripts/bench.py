#!/usr/bin/env python3
"""The benchmark: every expert-paging policy at several host budgets, on the trained small MoE,
measured on this machine's CPU in one run, plus a trace replay that MODELS other devices.

    python scripts/bench.py                       # full run, about 10-15 min on 2 cores
    python scripts/bench.py --quick               # smoke run, about 2 min
    python scripts/bench.py --replay rtx4090-desktop --traces results/bench/traces.json
                                                  # replay recorded traces only (seconds)

Measured (CPU execution provider; storage → host paging with real disk reads: O_DIRECT,
the runtime's default, os.sync() first), at host budgets of 10, 17, 25, 50 and 100 % of the
expert bytes, each run in a fresh Runtime on the same prompts:

  lru                      on-demand fetch, LRU eviction, plain decoding (MixtralOffload analogue)
  static+SD                the most routed experts resident (counts from a calibration pass on
                           other prompts), misses computed from storage (llama.cpp -ot analogue)
  lru+SD                   LRU with speculative decoding
  spac+SD (spac-counter)   SpAc with the published 0..5 counter
  spac+SD (decayed)        SpAc with our decayed-count estimator

At 100 % every expert fits, so the runtime holds them all (no pager): the policies do nothing
there and one run per decoding mode stands for all of them.

Routing traces (per target pass: tokens routed to each expert of each MoE layer, and the round's
accepted draft tokens) go to traces.json. The replay feeds them through a model of the cache
policies and a device profile's costs (profiles/*.yaml) and estimates tokens/s: those figures
are MODELLED, not measured, and are labelled so everywhere.

Outputs (--out-dir, default results/bench): results.json, traces.json, tokens_per_second.png,
hit_rate.png, expert_heatmap.png, replay_<profile>.png.

Model: the Qwen3-MoE + draft trained on the standard library (scripts/train_small_moe.py,
cache/trained/) exported into cache/packages/; without them, a random-weight stand-in
(scripts/bench_paging.py's fallback), which the output flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from spac.bench.measure import CONFIGS, PAGE_CACHE, SPAC, generate_all
from spac.bench.prompts import (CALIBRATION_MODULES, HELDOUT_MODULES, PAGING_MODULES, WARMUP_MODULE,
                                function_openings, heldout, warmup_prompt)
from spac.bench.replay import MODELLED, package_scale, qwen3_30b_a3b, replay_profile, slots_for
from spac.bench.trace import TraceRecorder, trace_frequencies

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

BUDGETS = (0.10, 0.17, 0.25, 0.50, 1.00)
DEFAULT_REPLAY = ("jetson-orin-agx-64gb", "rtx4090-desktop")

FULL = dict(prompts=8, max_new_tokens=96, repeats=3)
QUICK = dict(prompts=2, max_new_tokens=24, repeats=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke run (under 2 min, export included): {QUICK}")
    p.add_argument("--budgets", default=",".join(f"{b * 100:g}" for b in BUDGETS),
                   help="host budgets, percent of the expert bytes (comma-separated)")
    p.add_argument("--prompts", type=int, help=f"prompts per run (default {FULL['prompts']})")
    p.add_argument("--max-new-tokens", type=int, help=f"per prompt (default {FULL['max_new_tokens']})")
    p.add_argument("--prompt-set", choices=("heldout", "paging"), default="heldout",
                   help="heldout: modules train_small_moe.py holds out; paging: bench_paging.py's prompts")
    p.add_argument("--calibration", choices=("separate", "same"), default="separate",
                   help="static's frequencies from other prompts (separate) or the measured ones (an oracle)")
    p.add_argument("--repeats", type=int, help="sweeps of every budget and configuration; tokens/s is their "
                   f"median (default {FULL['repeats']}, --quick {QUICK['repeats']})")
    p.add_argument("--draft-len", type=int, default=4, help="γ for the SD runs")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--out-dir", type=Path, default=REPO / "results" / "bench")
    p.add_argument("--replay", action="append", metavar="PROFILE",
                   help=f"profile(s) to model from the traces (repeatable; default {', '.join(DEFAULT_REPLAY)}; "
                        "'none' for no replay)")
    p.add_argument("--replay-scale", choices=("qwen3-30b-a3b", "package"), default="qwen3-30b-a3b",
                   help="expert/trunk/draft sizes the replay charges: Qwen3-30B-A3B's (bf16) or the package's own")
    p.add_argument("--traces", type=Path, help="replay these recorded traces only (no measurement)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.prompts = args.prompts or preset["prompts"]
    args.max_new_tokens = args.max_new_tokens or preset["max_new_tokens"]
    args.repeats = args.repeats or preset["repeats"]
    args.budgets = tuple(float(b) / 100 for b in args.budgets.split(","))
    if any(not 0 <= b <= 1 for b in args.budgets):
        p.error("--budgets are percentages between 0 and 100")
    replay = args.replay or list(DEFAULT_REPLAY)
    args.replay = [] if replay == ["none"] else replay
    return args


# =============================================================================================
# Measuring


def choose_prompts(args) -> tuple[dict[str, str], dict[str, str], str]:
    """(measured prompts, calibration prompts, warm-up prompt)."""
    measured = function_openings(PAGING_MODULES if args.prompt_set == "paging" else HELDOUT_MODULES)
    measured = dict(list(measured.items())[:args.prompts])
    calibration = measured if args.calibration == "same" else function_openings(CALIBRATION_MODULES)
    return measured, calibration, warmup_prompt()


def run_config(package, texts: dict[str, str], warmup: str, args, speculative: bool, record: bool = False,
               **runtime_args) -> dict:
    """One fresh Runtime: a warm-up generation (ORT warm-up, first reads), then every prompt."""
    from spac.runtime import Runtime

    with Runtime(package, draft_len=args.draft_len, threads=args.threads, **runtime_args) as runtime:
        recorder = TraceRecorder(runtime, speculative) if record else None
        warm = runtime.generate(warmup, max_new_tokens=8, speculative=speculative)
        result = generate_all(runtime, list(texts.values()), speculative, args.max_new_tokens)
        if recorder is not None:
            lengths = [len(warm.token_ids)] + [len(ids) for ids in result["token_ids"]]
            result["trace"] = recorder.trace([WARMUP_MODULE, *texts], lengths)
        return result


def package_meta(package: Path, description: str) -> dict:
    from spac.runtime.manifest import load_manifest

    manifest = load_manifest(package)
    target = manifest.target
    files = manifest.files

    def streamed(prefix: str) -> int:
        return sum(e["bytes"] for name, e in files.items()
                   if name.startswith(prefix) and not name.startswith(f"{prefix}experts/"))

    return {"description": description, "package": str(package), "moe_layers": len(target.moe_layers),
            "moe_layer_indices": list(target.moe_layers),
            "num_experts": target.dims["num_experts"], "top_k": target.dims["top_k"],
            "bytes_per_expert": target.experts.bytes_per_expert, "expert_bytes_total": manifest.expert_bytes_total(),
            "trunk_bytes": streamed("target/"), "draft_bytes": streamed("draft/"),
            "draft_layers": len(manifest.draft.layers) if manifest.draft else 0,
            "hidden_size": target.dims["hidden_size"]}


def measure_all(args, package: Path, meta: dict) -> tuple[dict, dict]:
    """Every configuration at every budget; (measured results, traces)."""
    texts, calibration, warmup = choose_prompts(args)
    started = time.perf_counter()

    def log(label: str, r: dict) -> None:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        print(f"  {label:<34}{r['tokens_per_second']:>8.1f} tok/s  hit {r['hit_rate']:>6.1%}  "
              f"read {r['bytes_read'] / 1e6:>7.1f} MB  stall {r['stall_seconds']:>5.2f} s  accept {accept:>4}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)

    print("calibration pass (resident, SD) for static's frequencies: "
          f"{'the measured prompts (oracle)' if args.calibration == 'same' else ', '.join(calibration)}")
    trace_model = {k: meta[k] for k in ("moe_layers", "num_experts", "top_k", "bytes_per_expert", "trunk_bytes",
                                        "draft_bytes", "draft_layers", "description")}

    def as_trace(prompts: list[dict]) -> dict:
        return {"model": trace_model, "draft_len": args.draft_len, "prompts": prompts}

    calib = run_config(package, calibration, warmup, args, True, record=True)
    traces = {"calibration": as_trace(calib.pop("trace"))}
    frequencies = trace_frequencies(traces["calibration"])
    log("calibration", calib)

    by_layer = np.zeros((max(meta["moe_layer_indices"]) + 1, meta["num_experts"]), dtype=np.int64)
    by_layer[meta["moe_layer_indices"]] = frequencies  # the pager indexes its frequencies by layer index
    repeats: list[dict[str, dict[str, dict]]] = []
    for repeat in range(args.repeats):
        runs: dict[str, dict] = {}
        resident = {}
        # Later repeats run the configurations in reverse order: no one is always first after a change.
        configs = CONFIGS if repeat % 2 == 0 else CONFIGS[::-1]
        for budget in sorted(args.budgets, reverse=True):
            label = f"{budget:.0%}"
            print(f"host budget {label}: {slots_for(budget, meta['moe_layers'] * meta['num_experts'])} of "
                  f"{meta['moe_layers'] * meta['num_experts']} expert slots"
                  + (f" (repeat {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""))
            runs[label] = {}
            for name, speculative, policy, estimator in configs:
                if budget >= 1.0:
                    # Everything fits: the runtime holds every expert, no pager, no policy.
                    if speculative not in resident:
                        resident[speculative] = run_config(package, texts, warmup, args, speculative,
                                                           record=repeat == 0)
                        if repeat == 0:
                            traces["sd" if speculative else "no-sd"] = as_trace(resident[speculative].pop("trace"))
                        log(f"resident, {'SD' if speculative else 'no SD'}", resident[speculative])
                    runs[label][name] = {**resident[speculative], "resident": True}
                    continue
                extra = dict(policy=policy, host_budget=budget)
                if estimator:
                    extra["estimator"] = estimator
                if policy == "static":
                    extra["static_frequencies"] = by_layer
                runs[label][name] = run_config(package, texts, warmup, args, speculative, **extra)
                log(name, runs[label][name])
            runs[label] = {name: runs[label][name] for name, *_ in CONFIGS}
        repeats.append(runs)
    runs = merge_repeats(repeats)
    if "sd" not in traces:  # no 100 % budget asked for: record the traces anyway
        for speculative in (True, False):
            traces["sd" if speculative else "no-sd"] = as_trace(
                run_config(package, texts, warmup, args, speculative, record=True)["trace"])
    reference = next(iter(next(iter(runs.values())).values()))["token_ids"]
    lossless = all(r["token_ids"] == reference for rep in repeats for by in rep.values() for r in by.values())
    measured = {
        "note": "measured on this machine's CPU in one run",
        "prompts": [{"module": m, "heldout": heldout(m)} for m in texts],
        "calibration": {"prompts": list(calibration), "same_as_measured": args.calibration == "same",
                        **strip(calib)},
        "runs": {label: {name: strip(r) for name, r in by.items()} for label, by in runs.items()},
        "lossless": lossless,
        "seconds": time.perf_counter() - started,
    }
    measured["ratios"] = ratios(measured["runs"])
    return measured, traces


def merge_repeats(repeats: list[dict]) -> dict:
    """One result per budget and configuration: the first repeat's, with tokens/s the median over
    the repeats (each repeat's value kept in tokens_per_second_runs, and its hit rate too)."""
    merged = {}
    for label, by in repeats[0].items():
        merged[label] = {}
        for name, first in by.items():
            speeds = [rep[label][name]["tokens_per_second"] for rep in repeats]
            merged[label][name] = {**first, "tokens_per_second": statistics.median(speeds),
                                   "tokens_per_second_runs": speeds,
                                   "hit_rate_runs": [rep[label][name]["hit_rate"] for rep in repeats]}
    return merged


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("token_ids", "trace", "routing_counts")}


def ratios(runs: dict) -> dict:
    """Per budget: each spac run's tokens/s over static+SD's and over lru's (no SD), and the
    decayed estimator's hit rate against the counter's."""
    out = {}
    for label, by in runs.items():
        if any(by[n].get("resident") for n in by):
            continue
        row = {}
        for name in SPAC:
            speed = by[name]["tokens_per_second"]
            row[f"{name} / static+SD"] = speed / by["static+SD"]["tokens_per_second"]
            row[f"{name} / lru"] = speed / by["lru"]["tokens_per_second"]
        counter, decayed = (by[n]["hit_rate"] for n in SPAC)
        row["hit rate decayed - spac-counter (points)"] = 100 * (decayed - counter)
        out[label] = row
    return out


# =============================================================================================
# Reporting


def print_measured(measured: dict) -> None:
    print("\nMEASURED (this machine, CPU EP, storage → host paging with real disk reads)")
    print(f"{'budget':<8}{'run':<26}{'tok/s':>8}{'hit rate':>10}{'MB read':>10}{'stall s':>9}"
          f"{'prefetch i/u/d':>16}{'accept':>8}")
    for label, by in measured["runs"].items():
        for name, r in by.items():
            prefetch = f"{r['issued']}/{r['used']}/{r['dropped']}" if not r.get("resident") else "resident"
            accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
            print(f"{label:<8}{name:<26}{r['tokens_per_second']:>8.1f}{r['hit_rate']:>10.1%}"
                  f"{r['bytes_read'] / 1e6:>10.1f}{r['stall_seconds']:>9.2f}{prefetch:>16}{accept:>8}")
    print("\nratios measured in this run (tokens/s):")
    for label, row in measured["ratios"].items():
        parts = [f"{k} {v:.2f}×" if "points" not in k else f"{k} {v:+.1f}" for k, v in row.items()]
        print(f"  {label:>5}: " + "; ".join(parts))
    print(f"every run produced the same greedy tokens: {'yes' if measured['lossless'] else 'NO'}")


def print_replay(rep: dict) -> None:
    print(f"\n{MODELLED.upper()}: trace replay on {rep['profile']} ({rep['scale']}); swept tier: {rep['swept_tier']}")
    budgets = rep["budgets"]
    print(f"{'policy':<26}" + "".join(f"{b:>13.0%}" for b in budgets) + "   (modelled tok/s | hit rate)")
    for name, rows in rep["policies"].items():
        print(f"{name:<26}" + "".join(f"{r['tokens_per_second']:>7.1f}|{r['hit_rate']:>4.0%}" for r in rows))
    for name in SPAC:
        spac, static = rep["policies"][name], rep["policies"]["static+SD"]
        lru = rep["policies"]["lru"]
        print(f"  {name} / static+SD (modelled): " + ", ".join(
            f"{b:.0%} {s['tokens_per_second'] / t['tokens_per_second']:.2f}×" for b, s, t in zip(budgets, spac, static)))
        print(f"  {name} / lru (modelled):       " + ", ".join(
            f"{b:.0%} {s['tokens_per_second'] / t['tokens_per_second']:.2f}×" for b, s, t in zip(budgets, spac, lru)))


def plot(results: dict, traces: dict | None, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    measured = results.get("measured")
    if measured:
        labels = list(measured["runs"])
        budgets = [float(label.rstrip("%")) for label in labels]
        order = np.argsort(budgets)
        for key, ylabel, fname in (("tokens_per_second", "decode tokens/s", "tokens_per_second.png"),
                                   ("hit_rate", "host-tier hit rate", "hit_rate.png")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for name, *_ in CONFIGS:
                ys = [measured["runs"][labels[i]][name][key] for i in order]
                ax.plot([budgets[i] for i in order], ys, marker="o", label=name)
            ax.set_xlabel("host budget (% of expert bytes)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"MEASURED on this CPU: {ylabel} vs budget\n{results['model']['description'].split(' (')[0][:80]}",
                         fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=120)
            plt.close(fig)
            written.append(fname)
    if traces and "sd" in traces:
        trace = traces["sd"]
        meta = trace["model"]
        rounds = [np.asarray(r["counts"]) for p in trace["prompts"] if not p.get("warmup")
                  for r in p["rounds"] if r["kind"] != "prefill"]
        if rounds:
            stack = np.stack(rounds)  # [rounds, L, E]
            L = meta["moe_layers"]
            cols = min(L, 4)
            rows = math.ceil(L / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
            for l in range(L):
                ax = axes[l // cols][l % cols]
                image = ax.imshow(stack[:, l, :].T, aspect="auto", interpolation="nearest", cmap="viridis")
                ax.set_title(f"MoE layer {l}", fontsize=9)
                ax.set_xlabel("verify round (decode)")
                ax.set_ylabel("expert")
                fig.colorbar(image, ax=ax, fraction=0.046, label="tokens")
            for l in range(L, rows * cols):
                axes[l // cols][l % cols].axis("off")
            fig.suptitle("Expert activations per layer, SD run, measured prompts (recorded routing)", fontsize=10)
            fig.tight_layout()
            fig.savefig(out_dir / "expert_heatmap.png", dpi=110)
            plt.close(fig)
            written.append("expert_heatmap.png")
    for name, rep in results.get("replay", {}).get("profiles", {}).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        budgets = [100 * b for b in rep["budgets"]]
        for policy, rows in rep["policies"].items():
            axes[0].plot(budgets, [r["tokens_per_second"] for r in rows], marker="o", label=policy)
            axes[1].plot(budgets, [r["hit_rate"] for r in rows], marker="o", label=policy)
        axes[0].set_ylabel("modelled decode tokens/s")
        axes[1].set_ylabel(f"modelled {rep['swept_tier']}-tier hit rate")
        for ax in axes:
            ax.set_xlabel(f"{rep['swept_tier']} budget (% of expert bytes)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{MODELLED.upper()}: trace replay on {name} ({rep['scale']})", fontsize=10)
        fig.tight_layout()
        fname = f"replay_{name}.png"
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    return written


def run_replays(args, traces: dict, budgets) -> dict:
    meta = traces["sd"]["model"]
    scale = qwen3_30b_a3b() if args.replay_scale == "qwen3-30b-a3b" else package_scale(meta)
    frequencies = trace_frequencies(traces["calibration"]) if "calibration" in traces else \
        trace_frequencies(traces["sd"])
    out = {"note": MODELLED, "scale": asdict(scale),
           "assumptions": [
               "routing and draft acceptance are the recorded trace's (the trained small model, its γ)",
               f"each activated trace expert stands for {scale.top_k}/{meta['top_k']} activated experts in each of "
               f"{scale.layers}/{meta['moe_layers']} layers, all with its hit or miss",
               "trunk and draft run on the profile's GPU when it has one (else its CPU), costed with the "
               "profile's law over their streamed bytes",
               "one link transfer at a time; demand reads do not queue behind prefetches",
               "decode rounds timed; prefill and the warm-up prompt only change cache state"],
           "profiles": {}}
    for name in args.replay:
        rep = replay_profile(traces, name, budgets, scale, frequencies)
        rep["scale"] = scale.name
        out["profiles"][name] = rep
        print_replay(rep)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.traces:  # replay only
        traces = json.loads(args.traces.read_text())
        results = {"command": [sys.executable, *sys.argv], "traces": str(args.traces),
                   "model": traces["sd"]["model"]}
        results["replay"] = run_replays(args, traces, args.budgets)
        out = args.out_dir / "replay.json"
        out.write_text(json.dumps(results, indent=1) + "\n")
        files = plot(results, None, args.out_dir)
        print(f"\nwrote {out} and {', '.join(files)} in {args.out_dir} ({MODELLED})")
        return 0

    import bench_paging

    package, description = bench_paging.model_package()
    os.sync()  # DONTNEED cannot drop dirty pages: flush what the export just wrote
    meta = package_meta(package, description)
    report = REPO / "cache" / "trained" / "train_report.json"
    print(f"model: {description}")
    print(f"package: {package}: {meta['moe_layers']} MoE layers × {meta['num_experts']} experts, top-{meta['top_k']}, "
          f"{meta['bytes_per_expert'] / 1e6:.2f} MB per expert, {meta['expert_bytes_total'] / 1e6:.1f} MB in all")
    print(f"{args.prompts} prompts ({args.prompt_set}), {args.max_new_tokens} new tokens each, γ = {args.draft_len}, "
          f"{args.threads} threads, budgets {', '.join(f'{b:.0%}' for b in args.budgets)}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"storage reads: {PAGE_CACHE}\n")
    measured, traces = measure_all(args, package, meta)
    print_measured(measured)
    results = {
        "command": [Path(sys.executable).name, *sys.argv],
        "model": meta,
        "train_report": json.loads(report.read_text()) if report.is_file() else None,
        "settings": {"budgets": list(args.budgets), "prompts": args.prompts, "prompt_set": args.prompt_set,
                     "repeats": args.repeats,
                     "max_new_tokens": args.max_new_tokens, "draft_len": args.draft_len, "threads": args.threads,
                     "calibration": args.calibration, "quick": args.quick, "page_cache": PAGE_CACHE,
                     "cpus": os.cpu_count(), "load_average_end": os.getloadavg()[0],
                     "python": platform.python_version(), "machine": platform.machine()},
        "measured": measured,
    }
    traces_path = args.out_dir / "traces.json"
    traces_path.write_text(json.dumps(traces) + "\n")
    results["traces"] = str(traces_path)
    if args.replay:
        results["replay"] = run_replays(args, traces, args.budgets)
    files = plot(results, traces, args.out_dir)
    results["plots"] = files
    out = args.out_dir / "results.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}, {traces_path.name} and {', '.join(files)} in {args.out_dir}")
    return 0 if measured["lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
