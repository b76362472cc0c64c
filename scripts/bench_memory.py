#!/usr/bin/env python3
"""A model larger than memory: spac's pager against llama.cpp's mmap under the same real cgroup
memory caps, with the storage-bound limit each run could reach.

    python scripts/bench_memory.py --package PKG --model MODEL_DIR [--caps 0.3,0.45,0.6] [--repeats 1]
        [--llama-cpp DIR | $SPAC_LLAMA_CPP] [--out results/bench_memory.json]

PKG is the spac package of MODEL_DIR (the memory testbed: scripts/make_testbed.py, then
spac-export). For every cap (a fraction of the package's bytes, not counting draft copies of the
experts) each contender runs in a fresh process inside its own cgroup-v1 memory group at that cap
(scripts/memory_cap.py), after the page cache was dropped: llama.cpp (the same fp32 weights as
GGUF, mmap, greedy), spac `lru` and `spac` without speculative decoding, `static` + SD, `spac`
+ SD (with the package's draft model), `spac` + SD + the layer lookahead, and where the package
has draft copies of its experts (spac-export --draft-experts int4) `spac` + self SD at the
profile's self_draft_len, which holds them inside the same cap. The spac runs size their host cache with `--memory-limit auto`, i.e. from the cap
itself. Every spac run's greedy tokens are checked against transformers' `generate` on
MODEL_DIR. A package with quantized experts (spac-export --experts int4|int8) is measured
against llama.cpp's type of the same bits (Q4_0, Q8_0, from its llama-quantize), and its runs'
tokens are checked against the same package with every expert resident (quantized tokens are
not transformers'; how far they agree is reported).

The storage-bound limit of a run: Belady's MIN over the routing that run recorded (every pass,
SD verify passes included) with a cache of the run's size gives the bytes per generated token
that even an oracle must read; divided by the raw read bandwidth of the expert files (the
better of whole files read one at a time and as many at once as the pager reads; measured here,
O_DIRECT where the file system allows it) it is a time per token, and a token
cannot take less than the larger of that and the decode time with every expert resident. Each
run is reported as a share of that bound.

Results merge into --out by cap, so caps can be measured in separate invocations (each taking
the machine's heavy-work lock); the plot and the table are drawn from everything in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from spac.bench.measure import generate_all
from spac.bench.prompts import CALIBRATION_MODULES, HELDOUT_MODULES, function_openings
from spac.ops.direct_io import ALIGNMENT, aligned_buffer
from spac.ops.pager import READ_THREADS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import memory_cap  # noqa: E402  (sibling scripts, not a package)
from gguf_convert import (LLAMA_CPP_ENVIRONMENT, LLAMA_TYPE_OF_BITS, add_llama_cpp_argument, convert_to_gguf,  # noqa: E402
                          llama_cpp_binaries, quantize_gguf)

SELF = "spac+self SD"
CONTENDERS = {  # name -> (runtime options, speculative); every spac run reads with O_DIRECT
    "lru": (dict(policy="lru", direct_io=True, draft="none"), False),  # as spac-run --no-speculative
    "spac": (dict(policy="spac", direct_io=True, draft="none"), False),
    # with the package's draft model, asked for: under a limit that pages the experts spac-run
    # would decode without it
    "static+SD": (dict(policy="static", direct_io=True, draft="model"), True),
    "spac+SD": (dict(policy="spac", direct_io=True, draft="model"), True),
    "spac+SD+lookahead": (dict(policy="spac", direct_io=True, layer_lookahead=True, draft="model"), True),
    # the target drafting for itself from the package's int4 copies of its experts (spac-export
    # --draft-experts), at the profile's self_draft_len: run only where the package has them
    SELF: (dict(policy="spac", direct_io=True, draft="self", draft_len=None), True),
}
LLAMA = "llama.cpp (mmap)"
LLAMA_BINARIES = ("llama-simple", "llama-bench")
COMPARED = ("spac", "spac+SD", SELF)  # the runs whose ratios to every other run are reported


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--package", type=Path, help="the testbed's spac package")
    p.add_argument("--model", type=Path, help="the testbed's Hugging Face folder (reference tokens, llama.cpp)")
    p.add_argument("--caps", default="0.3,0.45,0.6", help="memory caps as fractions of the package's bytes")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--llama-tokens", type=int, default=16, help="tokens llama.cpp generates (it is slow here)")
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of every contender per cap, in a rotated order")
    add_llama_cpp_argument(p, "llama-simple or llama-bench")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spac-bench-memory",
                   help="scratch folder (the GGUF conversion is cached here)")
    p.add_argument("--out", type=Path, default=HERE.parent / "docs" / "results" / "bench_memory.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one run inside a cap
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ prompts


def prompt_sets(count: int) -> tuple[list[str], list[str]]:
    """(measured, calibration) prompts: held-out standard-library functions, as scripts/bench.py."""
    measured = list(function_openings(HELDOUT_MODULES).values())[:count]
    return measured, list(function_openings(CALIBRATION_MODULES).values())


def reference_tokens(model_dir: Path, package: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from spac.runtime.manifest import load_manifest
    from spac.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(load_manifest(package))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    eos = set(tokenizer.eos_token_ids)
    out = []
    for text in prompts:
        ids = torch.tensor([tokenizer.encode_prompt(text)])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False)[0, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        out.append(new[:cut])
    return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The share of `reference`'s tokens that `tokens` reproduce before they first differ."""
    def common_prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return sum(common_prefix(a, b) for a, b in zip(tokens, reference)) / max(1, sum(map(len, reference)))


# ------------------------------------------------------------------------------------ worker


def worker(config: dict) -> dict:
    """One run, inside its cap: generate every prompt, record the routing."""
    from spac.runtime import Runtime

    frequencies = np.asarray(config["static_frequencies"]) if config.get("static_frequencies") else None
    options = dict(config["options"])
    draft_len = options.pop("draft_len", config["draft_len"])  # None: the profile's for the draft mode
    # One process-wide ORT thread pool, as spac-run's default --thread-pool global, so that the
    # benchmark measures what the command runs (which pool is faster depends on the machine's
    # hour here: spac at a 45 % cap 29.5 against 24.6 tok/s in one, 31.2 against 33.5 in another).
    with Runtime(config["package"], draft_len=draft_len, threads=config["threads"], global_thread_pool=True,
                 static_frequencies=frequencies, memory_limit=config.get("memory_limit"),
                 host_budget=config.get("host_budget"), **options) as runtime:
        speculative = config["speculative"]
        runtime.generate("def f(x):", max_new_tokens=4, speculative=speculative)  # ORT warm-up
        routing, counts = [], None
        calibration = config.get("calibration") or []
        if calibration:
            counts = runtime.count_routing()  # what spac-run --save-routing records
            for text in calibration:
                runtime.generate(text, max_new_tokens=config["max_new_tokens"], speculative=speculative)
        runtime.target.on_routing = lambda layer, ids: routing.append((layer, routed_experts(ids)))
        result = generate_all(runtime, config["prompts"], speculative, config["max_new_tokens"])
        experts = runtime.experts
        every = len(runtime.manifest.target.moe_layers) * runtime.manifest.target.dims["num_experts"]
        result.update(slots=getattr(experts, "capacity", every), routing=routing,
                      thread_pool="per-session" if runtime.sessions.options.use_per_session_threads else "global",
                      static_frequencies=None if counts is None else counts.counts.tolist(),
                      memory=runtime.memory.as_dict() if runtime.memory else None,
                      lookahead=(experts.layer_lookahead.as_dict()
                                 if getattr(experts, "layer_lookahead", None) else None))
        return result


def routed_experts(topk_ids: np.ndarray) -> list[int]:
    """The distinct experts a layer's pass routes to (topk_ids [rows, k])."""
    return sorted(set(topk_ids.reshape(-1).tolist()))


def run_capped(cap: int | None, config: dict) -> dict:
    """The worker in a fresh process inside a cap of `cap` bytes (None: no cap), cache dropped."""
    return memory_cap.run_worker(Path(__file__).resolve(), config, cap or (1 << 50))


def model_bytes(manifest) -> int:
    """The package's bytes, which caps are shares of: the draft copies, which only a self-draft
    holds, do not count."""
    return sum(entry["bytes"] for name, entry in manifest.files.items() if name not in manifest.draft_expert_data)


# ------------------------------------------------------------------------------------ bounds


def belady_misses(accesses: list[tuple[int, int]], capacity: int, counted: list[bool] | None = None) -> int:
    """Misses of Belady's MIN (evict the expert used farthest in the future) on `accesses`; with
    `counted`, only the misses of the accesses it marks (all of them still fill the cache)."""
    following = [0] * len(accesses)
    seen: dict = {}
    for i in range(len(accesses) - 1, -1, -1):
        following[i] = seen.get(accesses[i], len(accesses))
        seen[accesses[i]] = i
    cache: dict = {}  # key -> its next use
    misses = 0
    for i, key in enumerate(accesses):
        if key not in cache:
            misses += counted is None or counted[i]
            if capacity <= 0:
                continue
            if len(cache) >= capacity:
                del cache[max(cache, key=cache.get)]
        cache[key] = following[i]
    return misses


def raw_read_bandwidth(package: Path, files: list[str], streams: int = 1, limit_bytes: int = 512 << 20) -> dict:
    """Whole-file reads of expert files right after a cache drop, `streams` files at a time (one
    after the other in each): O_DIRECT where the file system takes it, else buffered reads, into
    one buffer per stream of the runtime's kind, reused, so that no read pays for faulting its
    pages in (the runtime's reads do): what the storage itself delivers."""
    memory_cap.drop_page_cache()
    direct = hasattr(os, "O_DIRECT")
    chosen, total = [], 0
    for name in files:
        if total >= limit_bytes:
            break
        chosen.append(package / name)
        total += chosen[-1].stat().st_size

    def read_all(paths: list[Path]) -> bool:
        buffer, used_direct = None, direct
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if used_direct else 0))
            except OSError:
                used_direct, fd = False, os.open(path, os.O_RDONLY)
            try:
                aligned = -(-path.stat().st_size // ALIGNMENT) * ALIGNMENT
                if buffer is None or len(buffer) < aligned:  # the runtime's kind, reused: faulted once
                    buffer = aligned_buffer(aligned)
                os.preadv(fd, [buffer[:aligned]], 0)
            finally:
                os.close(fd)
        return used_direct

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        used = list(pool.map(read_all, [chosen[i::streams] for i in range(streams)]))
    seconds = time.perf_counter() - started
    return {"bytes": total, "seconds": seconds, "gb_per_second": total / seconds / 1e9, "o_direct": all(used),
            "streams": streams}


def storage_bound(run: dict, expert_bytes: int, bandwidth: float, resident_seconds_per_token: float) -> dict:
    accesses = [(layer, expert) for layer, experts in run["routing"] for expert in experts]
    misses = belady_misses(accesses, run["slots"] or 0)
    per_token = misses * expert_bytes / max(run["new_tokens"], 1)
    read_time = per_token / bandwidth
    bound = 1.0 / max(read_time, resident_seconds_per_token)
    return {"oracle_bytes_per_token": per_token, "oracle_read_seconds_per_token": read_time,
            "bound_tokens_per_second": bound, "share_of_bound": run["end_to_end_tokens_per_second"] / bound}


# ------------------------------------------------------------------------------------ llama.cpp


def llama_gguf(args, work: Path, bits: int | None) -> Path:
    """The model as GGUF (cached in `work`): fp32, or llama.cpp's type of the package's expert bits."""
    f32 = convert_to_gguf(args.llama_cpp, args.model, work)
    return f32 if bits is None else quantize_gguf(args.llama_cpp, f32, LLAMA_TYPE_OF_BITS[bits])


def llama_binary(folder: Path | None) -> Path | None:
    """llama-simple (greedy, real prompts) where it was built, else llama-bench (speed only)."""
    for name in LLAMA_BINARIES:
        if folder is not None and (llama_cpp_binaries(folder) / name).is_file():
            return llama_cpp_binaries(folder) / name
    return None


def run_llama(args, gguf: Path, cap: int, prompt: str) -> dict:
    binary = llama_binary(args.llama_cpp)
    if binary.name == "llama-simple":
        command = [str(binary), "-m", str(gguf), "-n", str(args.llama_tokens), prompt]
    else:  # its own token stream, not the prompt: the speed is comparable, the text is not
        command = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(args.llama_tokens), "-t", str(args.threads),
                   "-r", "1", "-o", "json"]
    memory_cap.drop_page_cache()
    with memory_cap.MemoryCap(cap) as group:
        started = time.perf_counter()
        done = group.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        oom = group.oom_kills
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}, oom kills {oom}: {done.stderr.strip()[-300:]}"}
    if binary.name == "llama-simple":
        speed = re.search(r"decoded (\d+) tokens in ([\d.]+) s, speed: ([\d.]+) t/s", done.stderr)
        tokens_per_second = float(speed.group(3)) if speed else None
    else:
        tokens_per_second = json.loads(done.stdout)[0]["avg_ts"]
    return {"tokens_per_second": tokens_per_second, "seconds": seconds, "binary": binary.name,
            "new_tokens": args.llama_tokens, "oom_kills": oom, "lossless": "not checked"}


# ------------------------------------------------------------------------------------ report


def merge(out: Path, key: str, entry: dict) -> dict:
    report = json.loads(out.read_text()) if out.exists() else {"caps": {}}
    report["caps"][key] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, out)
    return report


def plot(report: dict, path: Path) -> None:
    """Decode tokens/s by cap, and each spac run's share of its storage bound. The bound is per
    token of the whole run (its routing counts the prefill), so it is drawn as the share of
    end-to-end tokens/s it reaches, not as a line beside decode rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = sorted(report["caps"], key=float)
    figure, (rates, shares) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({name for cap in caps for name in report["caps"][cap]["runs"]})
    for name in names:
        runs = [(float(c) * 100, report["caps"][c]["runs"].get(name, {})) for c in caps]
        points = [(cap, run["tokens_per_second"]) for cap, run in runs if run.get("tokens_per_second")]
        if points:
            line, = rates.plot(*zip(*points), marker="o", label=name)
            bound = [(cap, 100 * run["bound"]["share_of_bound"]) for cap, run in runs if "bound" in run]
            if bound:
                shares.plot(*zip(*bound), marker="o", color=line.get_color(), label=name)
    rates.set(xlabel="memory cap, % of the model's bytes", ylabel="decode tokens/s", yscale="log",
              title="memory testbed under a cgroup cap")
    rates.legend(fontsize=8)
    shares.axhline(100, linestyle="--", color="grey")
    shares.set(xlabel="memory cap, % of the model's bytes", ylabel="% of the storage bound (end-to-end)",
               ylim=(0, 105), title="share of the run's own storage bound")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def table(report: dict) -> str:
    lines = ["| cap | run | tok/s | hit rate | MB read | stall s | storage busy | read GB/s | bound tok/s | % of bound "
             "| tokens = reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cap in sorted(report["caps"], key=float):
        for name, run in report["caps"][cap]["runs"].items():
            if "failed" in run:
                lines.append(f"| {float(cap):.0%} | {name} | failed: {run['failed'][:60]} | | | | | | | | |")
                continue
            bound = run.get("bound", {})
            cell = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
            lines.append(
                f"| {float(cap):.0%} | {name} | {cell(run.get('tokens_per_second'), '.2f')} | "
                f"{cell(run.get('hit_rate'), '.0%')} | {cell(run.get('bytes_read', None) and run['bytes_read'] / 1e6, '.0f')} | "
                f"{cell(run.get('stall_seconds'), '.1f')} | {cell(run.get('storage_busy'), '.0%')} | "
                f"{cell(run.get('read_gb_per_second'), '.2f')} | "
                f"{cell(bound.get('bound_tokens_per_second'), '.2f')} | {cell(bound.get('share_of_bound'), '.0%')} | "
                f"{run.get('lossless', '-')} |")
    return "\n".join(lines)


def measure_run(name: str, cap: int, base: dict, reference, resident, bandwidth, expert_bytes: int) -> dict:
    """One spac contender in its cap, with its lossless check and storage bound."""
    options, speculative = CONTENDERS[name]
    config = {**base, "options": options, "speculative": speculative, "memory_limit": "auto",
              "static_frequencies": resident["static_frequencies"] if options["policy"] == "static" else None}
    run = run_capped(cap, config)
    if "failed" not in run:
        run["lossless"] = run.pop("token_ids") == reference
        run["bound"] = storage_bound(run, expert_bytes, bandwidth["gb_per_second"] * 1e9,
                                     1.0 / resident["end_to_end_tokens_per_second"])
        if run.get("busy_seconds"):  # what the storage delivered while reads were in flight
            run["read_gb_per_second"] = run["bytes_read"] / run["busy_seconds"] / 1e9
            run["storage_busy"] = run["busy_seconds"] / run["seconds"]
        run.pop("routing")
        run.pop("static_frequencies", None)
    return run


def median_run(runs: list[dict]) -> dict:
    """The run of median decode speed, with every repeat's speed beside it (a failed run: the first)."""
    done = sorted((run for run in runs if "tokens_per_second" in run), key=lambda run: run["tokens_per_second"])
    if not done:
        return runs[0]
    return {**done[(len(done) - 1) // 2], "tokens_per_second_each": [run.get("tokens_per_second") for run in runs]}


def measure_cap(args, fraction: float, package_bytes: int, base: dict, reference, resident, bandwidth,
                expert_bytes: int, gguf, copies: bool) -> dict:
    """Every contender at one cap, `args.repeats` times in a rotated order (the storage's speed
    drifts over minutes on a shared machine), each reported by its median run."""
    cap = int(fraction * package_bytes)
    names = ([LLAMA] if gguf is not None else []) + [name for name in CONTENDERS if name != SELF or copies]
    measured = {name: [] for name in names}
    refused = set()  # refused the cap itself (MemoryLimitError): it would be again on every repeat
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            if name in refused:
                continue
            run = (run_llama(args, gguf, cap, base["prompts"][0]) if name == LLAMA else
                   measure_run(name, cap, base, reference, resident, bandwidth, expert_bytes))
            measured[name].append(run)
            print(f"  cap {fraction:.0%} {name}: {run.get('tokens_per_second', run.get('failed'))}", flush=True)
            if "MemoryLimitError" in run.get("failed", ""):
                refused.add(name)
    runs = {name: median_run(measured[name]) for name in names}
    speed = {name: run.get("tokens_per_second") for name, run in runs.items()}
    ratios = {f"{compared}/{name}": speed[compared] / value for compared in COMPARED if speed.get(compared)
              for name, value in speed.items() if value and name != compared}
    return {"cap_bytes": cap, "runs": runs, "ratios": ratios, "raw_read": bandwidth,
            "resident": {k: resident[k] for k in ("tokens_per_second", "end_to_end_tokens_per_second")},
            "load_average": os.getloadavg()[0]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.package is None or args.model is None:
        print("error: --package and --model are required", file=sys.stderr)
        return 2
    unavailable = memory_cap.available()
    if unavailable:
        print(f"error: cannot cap memory here: {unavailable}", file=sys.stderr)
        return 2
    from spac.runtime.manifest import load_manifest

    manifest = load_manifest(args.package)
    package_bytes = model_bytes(manifest)
    copies = manifest.target.draft_experts is not None
    expert_bytes = manifest.target.experts.bytes_per_expert
    prompts, calibration = prompt_sets(args.prompts)
    print(f"package {args.package}: {package_bytes / 1e9:.2f} GB, experts of {expert_bytes / 1e6:.1f} MB; "
          f"{len(prompts)} prompts x {args.max_new_tokens} tokens", flush=True)
    transformers_tokens = reference_tokens(args.model, args.package, prompts, args.max_new_tokens)
    quantization = manifest.target.experts.quantization
    base = {"package": str(args.package), "draft_len": args.draft_len, "threads": args.threads,
            "prompts": prompts, "max_new_tokens": args.max_new_tokens}
    resident = run_capped(None, {**base, "options": {"policy": "spac"}, "speculative": True, "host_budget": 1.0,
                                 "calibration": calibration})
    if "failed" in resident:
        print(f"error: the resident run failed: {resident['failed']}", file=sys.stderr)
        return 1
    reference = transformers_tokens if quantization is None else resident["token_ids"]
    checks = {"reference": "transformers generate" if quantization is None else
              f"this package with every expert resident (int{quantization.bits} experts)",
              "agreement_with_transformers": agreement(resident["token_ids"], transformers_tokens)}
    print(f"tokens checked against {checks['reference']}; every expert resident agrees with transformers on "
          f"{checks['agreement_with_transformers']:.0%} of the tokens", flush=True)
    # The storage's best rate, one file at a time or as many at once as the pager reads
    raw = [raw_read_bandwidth(args.package, sorted(manifest.expert_data), streams) for streams in (1, READ_THREADS)]
    bandwidth = max(raw, key=lambda measured: measured["gb_per_second"])
    print(f"resident spac+SD: {resident['tokens_per_second']:.2f} tok/s; raw read "
          + ", ".join(f"{m['gb_per_second']:.2f} GB/s with {m['streams']} in flight" for m in raw)
          + f" (O_DIRECT: {bandwidth['o_direct']})", flush=True)
    gguf = None
    if llama_binary(args.llama_cpp) is None:
        print(f"llama.cpp skipped: none of {', '.join(LLAMA_BINARIES)} under {args.llama_cpp}/build/bin "
              f"(give --llama-cpp DIR or {LLAMA_CPP_ENVIRONMENT})")
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        gguf = llama_gguf(args, args.work, None if quantization is None else quantization.bits)
    report = None
    for fraction in (float(c) for c in args.caps.split(",")):
        entry = measure_cap(args, fraction, package_bytes, base, reference, resident, bandwidth, expert_bytes, gguf,
                            copies)
        entry["raw_reads"] = raw
        entry["settings"] = {k: base[k] for k in ("draft_len", "threads", "max_new_tokens")} | {
            "prompts": len(prompts), "llama_tokens": args.llama_tokens, "llama_gguf": gguf and gguf.name,
            "repeats": args.repeats} | checks
        report = merge(args.out, f"{fraction:g}", entry)
    plot(report, args.out.with_suffix(".png"))
    print(table(report))
    for cap, entry in report["caps"].items():
        print(f"cap {float(cap):.0%}: " + ", ".join(f"{k} {v:.2f}x" for k, v in entry["ratios"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
