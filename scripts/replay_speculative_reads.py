#!/usr/bin/env python3
"""How many expert reads speculative decoding needs against plain decoding, with an oracle cache:
a replay over the routing plain decoding records, at any draft acceptance.

    python scripts/replay_speculative_reads.py --package cache/testbed/pkg [--slots 14,17]
        [--gammas 1,2,4] [--acceptance 0.5,0.7,0.9,1.0] [--prompts 12] [--max-new-tokens 32]
        [--out results/replay_speculative_reads.json]

Under a memory cap that pages the experts a token costs at least its reads, so whether a draft
can pay there depends on the expert reads per generated token. This script records the routing
of plain decoding on bench_memory.py's held-out prompts once (every expert resident: routing does
not depend on the cache), then replays speculative rounds over it. A round at token t verifies
γ + 1 rows: the k drafts accepted (each with probability p, one after the other, so at most γ)
and the token after them route as those tokens did; each rejected row routes either as a token
drawn at random from the recording or as the true next token (the two ends of the range
printed: what a wrong token's routing really is lies between, or near the second where wrong
drafts resemble the right ones). Every round reads the union of its rows' experts per layer.
Belady's MIN (evict what is used farthest ahead: bench_memory.py's oracle) with the given
number of cache slots then counts the reads of each, per decoded token: the prompts' prefills
fill the cache but their reads are not counted, as decode tok/s does not count their time.

Prints plain decoding's reads at each slot count and, per p and γ, speculative decoding's reads
and their ratio to plain decoding's at the same slots. A draft model also takes slots from the
cache (on the memory testbed at 45 %, 3 of 17), which is why plain decoding is measured at
both counts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import belady_misses, prompt_sets, routed_experts  # noqa: E402
from spac.runtime.manifest import write_atomic  # noqa: E402

Token = list  # per MoE layer, in order: the expert ids that token routes to


def record_routing(package: Path, prompts: list[str], max_new_tokens: int, threads: int) -> list[dict]:
    """Per prompt: the prefill's routing (per layer, the distinct experts of its rows) and each
    generated token's (per layer, its experts), from plain decoding."""
    from spac.runtime import Runtime

    recorded = []
    with Runtime(package, draft="none", threads=threads) as runtime:
        layers = list(runtime.manifest.target.moe_layers)
        for prompt in prompts:
            passes: list[dict] = []

            def on_routing(layer: int, topk_ids: np.ndarray) -> None:
                if layer == layers[0]:
                    passes.append({})
                passes[-1][layer] = routed_experts(topk_ids)

            runtime.target.on_routing = on_routing
            runtime.generate(prompt, max_new_tokens=max_new_tokens, speculative=False)
            prefill, *tokens = ([step[layer] for layer in layers] for step in passes)
            recorded.append({"prefill": prefill, "tokens": tokens})
    return recorded


def accesses_of(rounds: list[list[Token]]) -> list[tuple[int, int]]:
    """The (layer, expert) reads of rounds, each a list of rows: every layer reads the union of
    its rows' experts, the layers in order."""
    accesses = []
    for rows in rounds:
        for layer in range(len(rows[0])):
            accesses += [(layer, expert) for expert in sorted({e for row in rows for e in row[layer]})]
    return accesses


def speculative_rounds(tokens: list[Token], gamma: int, acceptance: float, rng: random.Random,
                       rejected_as_next: bool, others: list[Token]) -> list[list[Token]]:
    """Rounds of up to γ + 1 rows over a prompt's generated tokens (see the module's docstring)."""
    rounds, t = [], 0
    while t < len(tokens):
        drafts = min(gamma, len(tokens) - t - 1)  # as the runtime, no drafts past the last token
        accepted = 0
        while accepted < drafts and rng.random() < acceptance:
            accepted += 1
        rows = tokens[t:t + accepted + 1]
        for following in range(t + accepted + 1, t + drafts + 1):
            rows.append(tokens[following] if rejected_as_next else rng.choice(others))
        rounds.append(rows)
        t += accepted + 1
    return rounds


def reads_per_token(recorded: list[dict], slots: int, gamma: int = 0, acceptance: float = 0.0,
                    rejected_as_next: bool = True, seed: int = 0) -> float:
    """Belady's reads per decoded token over every prompt, one after the other (the cache
    carried over, as in bench_memory.py's runs); gamma 0 is plain decoding. The prefills' reads
    fill the cache but are not counted, as decode tok/s does not count their time."""
    rng, others = random.Random(seed), [token for prompt in recorded for token in prompt["tokens"]]
    accesses, counted, decoded = [], [], 0
    for prompt in recorded:
        prefill = accesses_of([[prompt["prefill"]]])
        rounds = (speculative_rounds(prompt["tokens"], gamma, acceptance, rng, rejected_as_next, others)
                  if gamma else [[token] for token in prompt["tokens"]])
        decode = accesses_of(rounds)
        accesses += prefill + decode
        counted += [False] * len(prefill) + [True] * len(decode)
        decoded += len(prompt["tokens"])
    return belady_misses(accesses, slots, counted) / decoded


def numbers(text: str, kind=float) -> list:
    return [kind(item) for item in text.split(",")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="a spac package (the memory testbed's)")
    parser.add_argument("--slots", type=lambda text: numbers(text, int), default=[14, 17],
                        help="cache slots, comma-separated (default: 14,17, the testbed's at 45 %% with and "
                             "without the draft model)")
    parser.add_argument("--gammas", type=lambda text: numbers(text, int), default=[1, 2, 4])
    parser.add_argument("--acceptance", type=numbers, default=[0.5, 0.7, 0.9, 1.0],
                        help="per-draft acceptance probabilities p (the testbed's draft: about 0.7)")
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="random acceptance draws averaged per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/replay_speculative_reads.json"))
    args = parser.parse_args(argv)

    recorded = record_routing(args.package, prompt_sets(args.prompts)[0], args.max_new_tokens, args.threads)
    report = {"prompts": len(recorded), "max_new_tokens": args.max_new_tokens, "plain": {}, "speculative": []}
    for slots in args.slots:
        report["plain"][slots] = reads_per_token(recorded, slots)
        print(f"plain decoding, {slots} slots: {report['plain'][slots]:.2f} reads a token")
    for slots in args.slots:
        for p in args.acceptance:
            for gamma in args.gammas:
                ends = [statistics.mean(reads_per_token(recorded, slots, gamma, p, as_next, seed)
                                        for seed in range(args.seeds)) for as_next in (True, False)]
                ratio = [value / report["plain"][slots] for value in ends]
                report["speculative"].append({"slots": slots, "acceptance": p, "gamma": gamma,
                                              "reads_per_token": ends, "vs_plain": ratio})
                print(f"speculative, {slots} slots, p {p:.2f}, γ {gamma}: {ends[0]:.2f}-{ends[1]:.2f} reads a "
                      f"token, {ratio[0]:.2f}-{ratio[1]:.2f}x plain decoding's")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
