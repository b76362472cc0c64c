"""Routing traces: what a Runtime's target routed in every forward pass, and how many draft
tokens each verify round accepted; the input of the replay (spac.bench.replay).

A trace is {"model": {"moe_layers": L, "num_experts": E, "top_k": k, ...},
            "prompts": [{"name", "warmup", "new_tokens", "rounds": [round, ...]}]},
a round {"kind": "prefill" | "verify" | "decode", "tokens": T, "accepted": a | None,
         "counts": [[tokens routed to expert e of MoE layer l]]}: one target pass.
"""

from __future__ import annotations

import numpy as np


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


def trace_frequencies(trace: dict, include_warmup: bool = False) -> np.ndarray:
    """Routing counts [layer, expert] summed over a trace's passes (static's offline counts)."""
    meta = trace["model"]
    total = np.zeros((meta["moe_layers"], meta["num_experts"]), dtype=np.int64)
    for prompt in trace["prompts"]:
        if include_warmup or not prompt.get("warmup"):
            for rnd in prompt["rounds"]:
                total += np.asarray(rnd["counts"], dtype=np.int64)
    return total
