"""Speculative decoding: the draft proposes γ tokens, the target verifies γ+1 positions in one
pass, both KV caches roll back to the accepted prefix.

Greedy decoding accepts a draft token when it equals the target's argmax, so the output is
exactly the target's greedy output. Sampling uses the standard rejection rule (accept d with
probability min(1, p(d)/q(d)), else sample from max(0, p - q)), so the output distribution is
exactly the target's (after temperature and top-p, applied to both models alike).

Each runner's cache holds a prefix of `tokens`; every forward first feeds what its cache lacks,
so rollback is just `truncate` and a fully accepted round needs no special case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from spac.ops.stats import add_fields

from .model import ModelRunner

if TYPE_CHECKING:
    from spac.ops.experts import Experts


class Sampler:
    """Greedy when temperature is 0; otherwise temperature + nucleus (top-p) sampling."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution tokens are drawn from (float64, sums to 1)."""
        scaled = logits.astype(np.float64) / self.temperature
        p = np.exp(scaled - scaled.max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = np.cumsum(p[order]) - p[order] < self.top_p  # the smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return p

    def draw(self, p: np.ndarray) -> int:
        return int(self.rng.choice(len(p), p=p))

    def pick(self, logits: np.ndarray) -> int:
        return int(logits.argmax()) if self.greedy else self.draw(self.probs(logits))


@dataclass
class DecodeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    __add__ = add_fields

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "draft_tokens_proposed": self.proposed, "draft_tokens_accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_per_round": self.mean_accepted_per_round}


class Decoder:
    """Generates after a prompt with the target alone or with a draft; `tokens` is the sequence.

    Every forward pass of the target is a round for its experts: the decoder tells them when
    one ends (`end_round`), so they can plan and prefetch for the next while the draft runs."""

    def __init__(self, target: ModelRunner, draft: ModelRunner | None, sampler: Sampler,
                 experts: Experts | None = None):
        """`experts`: the target's routed experts, told where each round ends."""
        self.target, self.draft, self.sampler, self.experts = target, draft, sampler, experts
        self.stats = DecodeStats()
        self.tokens: list[int] = []

    def prefill(self, prompt: list[int]) -> int:
        self.target.reset()
        if self.draft:
            self.draft.reset()
        self.tokens = list(prompt)
        first = self.sampler.pick(self.target.forward(self.tokens)[-1])
        self._end_round()
        self.tokens.append(first)
        return first

    def step(self, draft_len: int) -> list[int]:
        """One round: the new tokens (at least one). draft_len 0 (or no draft) is plain decoding."""
        if not self.draft or draft_len <= 0:
            token = self.sampler.pick(self.target.forward(self.tokens[self.target.length:])[-1])
            self._end_round()
            self.tokens.append(token)
            return [token]
        started = time.perf_counter()
        drafts, draft_probs = self._propose(draft_len)
        draft_seconds = time.perf_counter() - started
        new = self._verify(drafts, draft_probs)
        self._end_round(drafts, draft_seconds)
        self.tokens += new
        self.target.truncate(len(self.tokens) - 1)
        self.draft.truncate(min(self.draft.length, len(self.tokens) - 1))
        return new

    def _end_round(self, proposed: tuple[int, ...] | list[int] = (), draft_seconds: float = 0.0) -> None:
        if self.experts is not None:
            self.experts.end_round(proposed=proposed, draft_seconds=draft_seconds)

    def _propose(self, count: int):
        drafts, draft_probs = [], []
        feed = self.tokens[self.draft.length:]
        for _ in range(count):
            logits = self.draft.forward(feed)[-1]
            if self.sampler.greedy:
                drafts.append(int(logits.argmax()))
            else:
                draft_probs.append(self.sampler.probs(logits))
                drafts.append(self.sampler.draw(draft_probs[-1]))
            feed = [drafts[-1]]
        return drafts, draft_probs

    def _verify(self, drafts: list[int], draft_probs: list[np.ndarray]) -> list[int]:
        fed = self.tokens[self.target.length:]
        logits = self.target.forward(fed + drafts)
        rows = logits[len(fed) - 1:]  # rows[i] predicts the token after drafts[:i]
        self.stats.rounds += 1
        self.stats.proposed += len(drafts)
        new = []
        for i, token in enumerate(drafts):
            # A rejected token can't come back as its own replacement: greedy replaces it by a
            # different argmax, sampling draws from max(0, p - q), which is 0 where q > p.
            new.append(self._judge(token, rows[i], draft_probs[i] if draft_probs else None))
            if new[-1] != token:
                return new
            self.stats.accepted += 1
        new.append(self.sampler.pick(rows[len(drafts)]))  # all accepted: the target adds one more
        return new

    def _judge(self, token: int, target_logits: np.ndarray, q: np.ndarray | None) -> int:
        """The draft token if accepted, else the replacement token drawn by the target."""
        if q is None:
            return int(target_logits.argmax())
        p = self.sampler.probs(target_logits)
        if self.sampler.rng.random() < min(1.0, p[token] / q[token]):
            return token
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        # total is 0 only if rounding made p <= q everywhere: then p itself is the right law.
        return self.sampler.draw(residual / total if total > 0 else p)
