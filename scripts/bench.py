#!/usr/bin/env python3
"""The benchmark: every expert-paging policy at several host budgets, on the trained small MoE,
measured on this machine's CPU in one run, plus a trace replay that MODELS other devices.

    python scripts/bench.py                       # full run, about 10-15 min on 2 cores
    python scripts/bench.py --quick               # smoke run, about 2 min
    python scripts/bench.py --replay rtx4090-desktop --traces results/bench/traces.json
                                                  # replay recorded traces only (seconds)

Measured (CPU execution provider; storage → host paging with real disk reads: pread +
posix_fadvise(DONTNEED), os.sync() first), at host budgets of 10, 17, 25, 50 and 100 % of the
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
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

MODELLED = "MODELLED, not measured"
BUDGETS = (0.10, 0.17, 0.25, 0.50, 1.00)
# (name, speculative, policy, estimator)
CONFIGS = (
    ("lru", False, "lru", None),
    ("static+SD", True, "static", None),
    ("lru+SD", True, "lru", None),
    ("spac+SD (spac-counter)", True, "spac", "spac-counter"),
    ("spac+SD (decayed)", True, "spac", "decayed"),
)
SPAC = ("spac+SD (spac-counter)", "spac+SD (decayed)")
DEFAULT_REPLAY = ("jetson-orin-agx-64gb", "rtx4090-desktop")

# Prompts: the opening of the first function of standard-library modules that
# scripts/train_small_moe.py holds out of training (its 10 % path-hash split), so the draft's
# acceptance is not inflated by memorised text. Calibration uses other modules.
HELDOUT_MODULES = ("argparse.py", "copy.py", "dis.py", "fileinput.py", "functools.py", "sysconfig.py",
                   "tarfile.py", "timeit.py", "json/decoder.py", "unittest/suite.py", "xmlrpc/client.py",
                   "html/__init__.py")
CALIBRATION_MODULES = ("asyncio/events.py", "multiprocessing/connection.py", "importlib/metadata/__init__.py",
                       "crypt.py")
WARMUP_MODULE = "keyword.py"
PROMPT_CHARS = 300
HELDOUT_PERCENT = 10  # scripts/train_small_moe.py's split
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
# Trace replay: importable, no ONNX Runtime needed.
#
# A trace is {"model": {"moe_layers": L, "num_experts": E, "top_k": k, ...},
#             "prompts": [{"name", "warmup", "new_tokens", "rounds": [round, ...]}]},
# a round {"kind": "prefill" | "verify" | "decode", "tokens": T, "accepted": a | None,
#          "counts": [[tokens routed to expert e of MoE layer l]]}: one target pass.


@dataclass(frozen=True)
class Scale:
    """The sizes the replay charges. Routing comes from the trace; each activated trace expert
    stands for top_k / trace top-k activated experts, in each of layers / trace layers layers,
    all with its hit or miss."""

    name: str
    expert_bytes: int
    trunk_bytes: int  # target weights streamed per pass besides the routed experts
    draft_bytes: int  # draft weights streamed per draft token
    layers: int  # MoE layers
    experts: int  # experts per MoE layer
    top_k: int
    draft_layers: int


def qwen3_30b_a3b() -> Scale:
    """Qwen3-30B-A3B in bf16 (48 layers, 128 experts of 3·2048·768, top-8, 32 query and 4 KV heads
    of 128, vocabulary 151936) with Qwen3-0.6B (bf16) as the draft."""
    hidden, layers, vocab = 2048, 48, 151936
    attention = hidden * 32 * 128 * 2 + hidden * 4 * 128 * 2  # q, o + k, v
    trunk = layers * (attention + hidden * 128) + vocab * hidden  # + router; + lm_head (embedding is a lookup)
    return Scale("qwen3-30b-a3b (bf16) + qwen3-0.6b draft", expert_bytes=3 * hidden * 768 * 2, trunk_bytes=2 * trunk,
                 draft_bytes=2 * 596_000_000, layers=layers, experts=128, top_k=8, draft_layers=28)


def package_scale(model: dict) -> Scale:
    return Scale(f"the package's own sizes ({model['bytes_per_expert'] / 1e6:.2f} MB per expert)", model["bytes_per_expert"],
                 model["trunk_bytes"], model["draft_bytes"], model["moe_layers"], model["num_experts"],
                 model["top_k"], model.get("draft_layers", 1))


class PolicyCache:
    """The cache tier under one policy, with ops/pager.py's rules: `lru` admits every expert it
    had to fetch and evicts the least recently used; `static` holds a fixed set (the most frequent
    in `frequencies`) and admits nothing; `spac` admits an expert only into a slot of lower
    utility, never one of the layer being computed, slots of layers computed this pass first.
    A capacity that holds every expert holds them all from the start (the runtime then loads
    every expert), whatever the policy."""

    def __init__(self, policy: str, capacity: int, shape: tuple[int, int], estimator=None, frequencies=None):
        self.policy, self.capacity, self.shape, self.estimator = policy, capacity, shape, estimator
        self.slots: OrderedDict[tuple[int, int], float] = OrderedDict()  # key -> utility, LRU order
        layers, experts = shape
        self.resident = capacity >= layers * experts
        if self.resident:
            self.slots.update(((l, e), 0.0) for l in range(layers) for e in range(experts))
        elif policy == "static":
            freq = np.zeros(shape) if frequencies is None else np.asarray(frequencies, dtype=np.float64)
            for flat in np.argsort(-freq, axis=None, kind="stable")[:capacity]:
                key = divmod(int(flat), experts)
                self.slots[key] = float(freq.reshape(-1)[flat])

    def __contains__(self, key) -> bool:
        return key in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def utility(self, key) -> float:
        return float(self.estimator.utilities()[key]) if self.estimator is not None else 0.0

    def touch(self, key) -> None:
        self.slots.move_to_end(key)

    def victim(self, utility: float, frozen, computed):
        if self.policy == "lru":
            return next(iter(self.slots), None)
        candidates = [(key[0] not in computed, u, key) for key, u in self.slots.items()
                      if key[0] != frozen and u < utility]
        return min(candidates)[2] if candidates else None

    def has_room_for(self, utility: float, frozen, computed) -> bool:
        return len(self.slots) < self.capacity or self.victim(utility, frozen, computed) is not None

    def admit(self, key, frozen, computed) -> bool:
        if self.resident or self.policy == "static" or self.capacity == 0:
            return key in self.slots
        if key in self.slots:
            return True
        utility = self.utility(key)
        if len(self.slots) >= self.capacity:
            victim = self.victim(utility if self.policy == "spac" else math.inf, frozen, computed)
            if victim is None:
                return False
            del self.slots[victim]
        self.slots[key] = utility
        return True

    def refresh(self) -> None:
        if self.estimator is not None and not self.resident:
            utilities = self.estimator.utilities()
            for key in self.slots:
                self.slots[key] = float(utilities[key])


class HostTier:
    """The host tier behind a GPU's cache (GPU profiles only): LRU over the profile's host budget;
    None means it holds every expert."""

    def __init__(self, capacity: int | None):
        self.capacity, self.slots = capacity, OrderedDict()
        self.misses = 0

    def read(self, key) -> bool:
        """True if the expert was in host memory; a miss is read from storage and kept."""
        if self.capacity is None:
            return True
        if key in self.slots:
            self.slots.move_to_end(key)
            return True
        self.misses += 1
        if self.capacity > 0:
            if len(self.slots) >= self.capacity:
                self.slots.popitem(last=False)
            self.slots[key] = None
        return False


def stream_ms(profile, ep: str, tokens: float, nbytes: float, calls: int) -> float:
    """A dense pass over `nbytes` of weights with the profile's cost law for `ep`: `calls` call
    overheads + streaming + per-token arithmetic."""
    cost = profile.expert_costs[ep]
    return calls * cost.a_ms + nbytes / 1e6 * (cost.ms_per_mb + cost.b_ms_per_token_per_mb * tokens)


def slots_for(fraction: float, total: int) -> int:
    return int(math.floor(fraction * total + 1e-9))


def replay(trace: dict, policy: str, budget: float, profile, scale: Scale, estimator: str | None = None,
           frequencies=None) -> dict:
    """Model one policy at one budget on one profile from a recorded trace. MODELLED, not measured.

    The swept cache is the device tier on a profile with a GPU (the paper's "experts cached in
    VRAM"; the host tier keeps the profile's budget) and the host tier on a CPU-only profile.
    A round is the draft's γ tokens (the link prefetches meanwhile), then the target pass: each
    MoE layer after its share of the trunk. On a GPU, `lru` fetches every miss over the link and
    runs all experts on the GPU (MixtralOffload); `static` and `spac` split each layer between the
    GPU (cached experts) and the CPU (misses, from host RAM) with the balancer's greedy plan. On
    the CPU a miss is a storage read. `spac` prefetches, after each pass, the highest-utility
    experts over the link, one at a time, dropping a request whose layer has started (the pager's
    rules). Decode rounds are timed and counted; prefill and warm-up prompts only change the cache.
    """
    from spac.runtime.balancer import Costs, LayerInput, greedy_layer, layer_time
    from spac.runtime.estimator import make_estimator

    meta = trace["model"]
    L, E = meta["moe_layers"], meta["num_experts"]
    layer_mult = scale.layers / L
    call_mult = max(1, round(scale.top_k / meta["top_k"]))
    gpu = profile.has_gpu
    ep = "cuda" if gpu else "cpu"
    costs = Costs(profile, scale.expert_bytes)
    storage_ms = profile.transfer_ms(scale.expert_bytes, "storage_to_host")
    bundle = call_mult * layer_mult  # real experts per activated trace expert
    link_ms = (costs.fetch_ms if gpu else storage_ms) * bundle
    host = None
    if gpu:
        total = scale.expert_bytes * scale.layers * scale.experts
        host_bytes = profile.budget_bytes("host", total, scale.trunk_bytes)
        host = HostTier(None if host_bytes is None or host_bytes >= total else slots_for(host_bytes / total, L * E))
    est = make_estimator(estimator, L, E) if policy == "spac" else None
    cache = PolicyCache(policy, slots_for(budget, L * E), (L, E), est, frequencies)
    prefetching = policy == "spac" and cache.capacity > 0 and not cache.resident
    queue: list[tuple[int, int]] = []  # next round's prefetches, best first
    in_flight = None  # (finish time, key): the worker reads one expert at a time
    link_free = 0.0
    totals = dict(seconds=0.0, tokens=0, rounds=0, hits=0, lookups=0, stall_ms=0.0, storage_ms=0.0,
                  issued=0, used=0, dropped=0)
    prefetched: set = set()

    def complete(frozen, computed):
        nonlocal in_flight
        key = in_flight[1]
        in_flight = None
        if cache.admit(key, frozen, computed):
            prefetched.add(key)
        else:
            totals["dropped"] += 1

    def advance(until: float, layer: int | None, computed: set) -> None:
        """Run the prefetch worker until `until`; `layer` is the layer being computed meanwhile
        (None: the draft, after the last pass)."""
        nonlocal in_flight, link_free
        while True:
            if in_flight is not None:
                if in_flight[0] > until:
                    return
                complete(layer, computed)
            if not queue or max(link_free, 0.0) >= until:
                return
            key = queue.pop(0)
            if layer is not None and key[0] <= layer:  # its layer has started: stale
                totals["dropped"] += 1
                continue
            if key in cache or not cache.has_room_for(cache.utility(key), layer, computed):
                continue
            read_ms = link_ms
            if host is not None and not host.read(key):
                read_ms += storage_ms * bundle
            link_free = max(link_free, 0.0) + read_ms
            in_flight = (link_free, key)

    def run_layer(l: int, counts: np.ndarray, computed: set) -> tuple[float, float, int, int]:
        """(ms for the real layers this trace layer stands for, of which storage reads, hits, lookups)."""
        active = [int(e) for e in np.flatnonzero(counts)]
        hits = [e for e in active if (l, e) in cache]
        misses = [e for e in active if (l, e) not in cache]
        for e in hits:
            if (l, e) in prefetched:
                prefetched.discard((l, e))
                totals["used"] += 1
            if policy == "lru":
                cache.touch((l, e))
        extra = 0.0  # storage reads on the critical path
        if not gpu:
            ms = sum(costs.cpu(float(counts[e])) for e in active) * call_mult + len(misses) * storage_ms * call_mult
            extra = len(misses) * storage_ms * call_mult
        else:
            expanded = {e * call_mult + j: float(counts[e]) for e in active for j in range(call_mult)}
            resident = frozenset(e * call_mult + j for e in hits for j in range(call_mult))
            inp = LayerInput(expanded, resident)
            if policy == "lru" and not cache.resident:
                plan_gpu = expanded.keys()  # every expert on the GPU, misses fetched first
            else:
                plan_gpu = greedy_layer(costs, inp, free_slots=0).gpu
            ms = layer_time(costs, inp, plan_gpu)
            extra = sum(storage_ms * call_mult for e in misses if not host.read((l, e)))
            ms += extra
        for e in misses:
            if policy != "lru" and gpu:
                break  # static/spac compute GPU misses on the CPU: nothing moves to the device
            cache.admit((l, e), l, computed)
        return ms * layer_mult, extra * layer_mult, len(hits), len(active)

    for prompt in trace["prompts"]:
        counted = not prompt.get("warmup")
        produced = 0
        for rnd in prompt["rounds"]:
            counts = np.asarray(rnd["counts"], dtype=np.int64)
            kind, T = rnd["kind"], rnd["tokens"]
            timed = counted and kind != "prefill"
            gamma = T - 1 if kind == "verify" else 0
            t = gamma * stream_ms(profile, ep, 1, scale.draft_bytes, scale.draft_layers)
            trunk_share = stream_ms(profile, ep, T, scale.trunk_bytes, scale.layers) / L
            computed = set(range(L))
            if prefetching:
                advance(t, None, computed)
            stall_total = 0.0
            for l in range(L):
                t += trunk_share
                computed = set(range(l))
                if prefetching:
                    advance(t, l - 1 if l else None, computed if l else set(range(L)))
                    if in_flight is not None and in_flight[1][0] == l and counts[l, in_flight[1][1]] > 0:
                        stall = in_flight[0] - t  # the layer needs the expert being read: wait
                        t += stall
                        stall_total += stall
                        link_free = t
                        complete(l, computed)
                ms, extra, hits, lookups = run_layer(l, counts[l], computed)
                t += ms
                stall_total += extra
                if timed:
                    totals["hits"] += hits
                    totals["lookups"] += lookups
            if est is not None:
                est.update(counts)
                cache.refresh()
            if prefetching:
                totals["dropped"] += len(queue)
                utilities = est.utilities()
                queue = []
                for flat in np.argsort(-utilities, axis=None, kind="stable")[:cache.capacity]:
                    key = divmod(int(flat), E)
                    if utilities[key] <= 0:
                        break
                    if key not in cache:
                        queue.append(key)
                totals["issued"] += len(queue)
                link_free -= t
                if in_flight is not None:
                    in_flight = (in_flight[0] - t, in_flight[1])
            if timed:
                totals["seconds"] += t / 1000
                totals["rounds"] += 1
                totals["stall_ms"] += stall_total
                produced += (rnd["accepted"] or 0) + 1
        if counted:
            limit = prompt.get("new_tokens")
            totals["tokens"] += produced if limit is None else min(produced, max(limit - 1, 0))
    return {
        "tokens_per_second": totals["tokens"] / totals["seconds"] if totals["seconds"] else 0.0,
        "hit_rate": totals["hits"] / totals["lookups"] if totals["lookups"] else 1.0,
        "slots": cache.capacity, "host_misses": host.misses if host else None,
        "prefetch": {k: totals[k] for k in ("issued", "used", "dropped")},
        **{k: totals[k] for k in ("tokens", "rounds", "seconds", "stall_ms")},
    }


def trace_frequencies(trace: dict, include_warmup: bool = False) -> np.ndarray:
    """Routing counts [layer, expert] summed over a trace's passes (static's offline counts)."""
    meta = trace["model"]
    total = np.zeros((meta["moe_layers"], meta["num_experts"]), dtype=np.int64)
    for prompt in trace["prompts"]:
        if include_warmup or not prompt.get("warmup"):
            for rnd in prompt["rounds"]:
                total += np.asarray(rnd["counts"], dtype=np.int64)
    return total


def replay_profile(traces: dict, profile_name: str, budgets, scale: Scale, frequencies) -> dict:
    """Every measured configuration, modelled on one profile at every budget."""
    from spac.runtime.profile import load_profile

    profile = load_profile(profile_name)
    out = {"note": MODELLED, "profile": profile.name, "description": profile.description,
           "swept_tier": "device" if profile.has_gpu else "host", "budgets": list(budgets), "policies": {}}
    for name, speculative, policy, estimator in CONFIGS:
        trace = traces["sd" if speculative else "no-sd"]
        out["policies"][name] = [
            {"budget": b, **replay(trace, policy, b, profile, scale, estimator, frequencies)} for b in budgets]
    return out


# =============================================================================================
# Recording traces from a Runtime


class TraceRecorder:
    """Records every target pass of a Runtime: tokens routed per expert per MoE layer (through
    ModelRunner.on_routing) and, from the KV-cache length before each pass, the draft tokens each
    verify round accepted. A pass on an empty cache is a prefill and starts a new prompt; the
    last round of a prompt is settled from the cache length just before the next reset."""

    def __init__(self, runtime, speculative: bool):
        self.runner, self.speculative = runtime.target, speculative
        target = runtime.manifest.target
        self.position = {layer: i for i, layer in enumerate(target.moe_layers)}
        self.shape = (len(target.moe_layers), target.dims["num_experts"])
        self.prompts: list[list[dict]] = []
        forward = self.runner.forward

        def recorded(tokens):
            self._begin(len(tokens), self.runner.length)
            return forward(tokens)

        reset = self.runner.reset

        def settle_then_reset():
            self._close()
            return reset()

        self.runner.forward = recorded
        self.runner.reset = settle_then_reset
        self.runner.on_routing = self._routing

    def _begin(self, tokens: int, length: int) -> None:
        if length == 0:
            self.prompts.append([])
        self.prompts[-1].append({"tokens": tokens, "start": length, "counts": np.zeros(self.shape, np.int64)})

    def _routing(self, layer: int, topk_ids: np.ndarray) -> None:
        counts = self.prompts[-1][-1]["counts"][self.position[layer]]
        np.add.at(counts, topk_ids.reshape(-1), 1)

    def _close(self) -> None:
        """Settle the last prompt's rounds: each one's acceptance from the next one's start."""
        if not self.prompts or not self.prompts[-1] or "kind" in self.prompts[-1][-1]:
            return
        rounds = self.prompts[-1]
        ends = [r["start"] for r in rounds[1:]] + [self.runner.length]
        for r, end in zip(rounds, ends):
            if "kind" in r:
                continue
            if r["start"] == 0:
                r["kind"], r["accepted"] = "prefill", None
            elif self.speculative and r["tokens"] > 1:
                r["kind"], r["accepted"] = "verify", end - r["start"] - 1
                if not 0 <= r["accepted"] < r["tokens"]:
                    raise RuntimeError(f"a verify pass of {r['tokens']} tokens from position {r['start']} left "
                                       f"{end} cached: cannot settle its acceptance")
            else:
                r["kind"], r["accepted"] = "decode", 0

    def trace(self, names: list[str], new_tokens: list[int], warmup: int = 1) -> list[dict]:
        self._close()
        if len(self.prompts) != len(names):
            raise RuntimeError(f"recorded {len(self.prompts)} prompts, expected {len(names)}")
        return [{"name": name, "warmup": i < warmup, "new_tokens": n,
                 "rounds": [{"kind": r["kind"], "tokens": r["tokens"], "accepted": r["accepted"],
                             "counts": r["counts"].tolist()} for r in rounds]}
                for i, (name, n, rounds) in enumerate(zip(names, new_tokens, self.prompts))]


# =============================================================================================
# Measuring


def heldout(module: str) -> bool:
    """Whether scripts/train_small_moe.py holds this standard-library path out of training."""
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def snippets(modules) -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = {}
    for name in modules:
        path = stdlib / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        start = text.find("\ndef ") + 1
        found[name] = text[start:start + PROMPT_CHARS]
    return found


def choose_prompts(args) -> tuple[dict[str, str], dict[str, str], str]:
    """(measured prompts, calibration prompts, warm-up prompt)."""
    import bench_paging

    if args.prompt_set == "paging":
        measured = {k: v for k, v in bench_paging.prompts().items() if k != bench_paging.WARMUP_MODULE}
    else:
        measured = snippets(HELDOUT_MODULES)
    measured = dict(list(measured.items())[:args.prompts])
    calibration = measured if args.calibration == "same" else snippets(CALIBRATION_MODULES)
    return measured, calibration, snippets([WARMUP_MODULE])[WARMUP_MODULE]


def run_config(package, texts: dict[str, str], warmup: str, args, speculative: bool, record: bool = False,
               **runtime_args) -> dict:
    """One fresh Runtime: a warm-up generation (ORT warm-up, first reads), then every prompt."""
    import bench_paging
    from spac.runtime import Runtime

    with Runtime(package, draft_len=args.draft_len, threads=args.threads, **runtime_args) as runtime:
        recorder = TraceRecorder(runtime, speculative) if record else None
        warm = runtime.generate(warmup, max_new_tokens=8, speculative=speculative)
        result = bench_paging.measure(runtime, list(texts.values()), speculative, args.max_new_tokens)
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
    print(f"storage reads: {bench_paging.PAGE_CACHE}\n")
    measured, traces = measure_all(args, package, meta)
    print_measured(measured)
    results = {
        "command": [Path(sys.executable).name, *sys.argv],
        "model": meta,
        "train_report": json.loads(report.read_text()) if report.is_file() else None,
        "settings": {"budgets": list(args.budgets), "prompts": args.prompts, "prompt_set": args.prompt_set,
                     "repeats": args.repeats,
                     "max_new_tokens": args.max_new_tokens, "draft_len": args.draft_len, "threads": args.threads,
                     "calibration": args.calibration, "quick": args.quick, "page_cache": bench_paging.PAGE_CACHE,
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
