"""Speculative decoding: the draft proposes γ tokens, the target verifies γ+1 positions in one
pass, both KV caches roll back to the accepted prefix.

Greedy decoding accepts a draft token when it equals the target's argmax, so the output is
exactly the target's greedy output. Sampling uses the standard rejection rule (accept d with
probability min(1, p(d)/q(d)), else sample from max(0, p - q)), so the output distribution is
exactly the target's (after temperature and top-p, applied to both models alike).

Each runner's cache holds a prefix of `tokens`; every forward first feeds what its cache lacks,
so rollback is just `truncate` and a fully accepted round needs no special case. A self-draft
(the target's twin, spac.runtime.model) shares the target's cache and writes the speculative
positions into it; the target truncates them before it verifies, so the verify pass recomputes
every position it judges with the full model.
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


# What drafts: the package's draft model, the target itself with the experts it holds, or nothing.
DRAFT_MODES = ("model", "self", "none")
# Each sampling option and the value that turns it off.
SAMPLING_OPTIONS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                    "frequency_penalty": 0.0, "presence_penalty": 0.0}


class Sampler:
    """Greedy when temperature is 0; otherwise temperature, top-k, top-p (nucleus) and min-p
    sampling. Repetition, frequency and presence penalties change the logits first, greedy or not.

    Penalties depend on the sequence so far, so every call takes the `context` (all tokens before
    the position) and `prompt_length` (how many of them are the prompt): the draft's q and the
    target's p at a position are computed from the same context, which keeps speculative sampling
    exact. The repetition penalty sees the prompt too (as transformers' does); frequency and
    presence penalties count generated tokens only (as OpenAI's do)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0):
        checks = ((temperature >= 0, "temperature must be >= 0"), (0 < top_p <= 1, "top_p must be in (0, 1]"),
                  (top_k >= 0, "top_k must be >= 0 (0 = off)"), (0 <= min_p <= 1, "min_p must be in [0, 1]"),
                  (repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got temperature={temperature}, top_p={top_p}, top_k={top_k}, "
                                 f"min_p={min_p}, repetition_penalty={repetition_penalty}")
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, int(top_k), min_p
        self.repetition_penalty = repetition_penalty
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_options(cls, defaults: dict, seed: int | None = None, **options) -> "Sampler":
        """A sampler from the caller's options; those left None come from `defaults` (the model's
        generation_config.json, as the package carries it) the way transformers reads them:
        temperature, top-k, top-p and min-p only when it says do_sample, else greedy."""
        unknown = set(options) - set(SAMPLING_OPTIONS)
        if unknown:
            raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; valid: {list(SAMPLING_OPTIONS)}")
        sampling = defaults.get("do_sample") is True
        chosen = {}
        for name, off in SAMPLING_OPTIONS.items():
            default = defaults.get(name) if sampling or name == "repetition_penalty" else None
            if default is not None and (isinstance(default, bool) or not isinstance(default, (int, float))):
                raise ValueError(f"the package's generation default {name}={default!r} is not a number")
            given = options.get(name)
            chosen[name] = given if given is not None else default if default is not None else off
        if sampling and defaults.get("temperature") is None and options.get("temperature") is None:
            chosen["temperature"] = 1.0  # transformers' default temperature when it samples
        return cls(seed=seed, **chosen)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def penalize(self, logits: np.ndarray, context=(), prompt_length: int = 0) -> np.ndarray:
        """The logits after the penalties (a float64 copy); the logits themselves when no penalty is set."""
        if not self.penalized or not len(context):
            return logits
        logits = logits.astype(np.float64)
        context = np.asarray(context, dtype=np.int64)
        if self.repetition_penalty != 1:
            seen = np.unique(context)
            # transformers' rule: a positive logit is divided by the penalty, a negative one multiplied.
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / self.repetition_penalty, values * self.repetition_penalty)
        generated = context[prompt_length:]
        if len(generated) and (self.frequency_penalty or self.presence_penalty):
            counts = np.bincount(generated, minlength=len(logits))[:len(logits)]
            logits -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0)
        return logits

    def probs(self, logits: np.ndarray, context=(), prompt_length: int = 0) -> np.ndarray:
        """The distribution tokens are drawn from (float64, sums to 1): penalties, temperature,
        then the top-k, top-p and min-p filters, in transformers' order."""
        scaled = self.penalize(logits, context, prompt_length).astype(np.float64) / self.temperature
        p = np.exp(scaled - scaled.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        keep = np.ones(len(p), dtype=bool)
        if 0 < self.top_k < len(p):
            keep[self.top_k:] = False
        if self.top_p < 1:
            kept = np.where(keep[:len(order)], p[order], 0.0)
            mass = kept / kept.sum()
            keep &= np.cumsum(mass) - mass < self.top_p  # the smallest set reaching top_p
        if self.min_p > 0:  # relative to the most likely token, which every filter keeps
            keep &= p[order] >= self.min_p * p[order[0]]
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        return p / p.sum()

    def draw(self, p: np.ndarray) -> int:
        return int(self.rng.choice(len(p), p=p))

    def pick(self, logits: np.ndarray, context=(), prompt_length: int = 0) -> int:
        if self.greedy:
            return int(self.penalize(logits, context, prompt_length).argmax())
        return self.draw(self.probs(logits, context, prompt_length))


@dataclass
class DecodeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    reused: int = 0  # prompt tokens the target's cache already held
    draft_seconds: float = 0.0  # drafting, summed over the rounds
    verify_seconds: float = 0.0  # the target's verify passes, summed over the rounds

    __add__ = add_fields

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"reused_prompt_tokens": self.reused, "rounds": self.rounds, "draft_tokens_proposed": self.proposed,
                "draft_tokens_accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_per_round": self.mean_accepted_per_round,
                "draft_seconds_per_round": self.draft_seconds / self.rounds if self.rounds else 0.0,
                "verify_seconds_per_round": self.verify_seconds / self.rounds if self.rounds else 0.0}


class Decoder:
    """Generates after a prompt with the target alone or with a draft; `tokens` is the sequence.

    With `prefill(prompt, reuse=True)` the runners keep their KV caches from the previous
    generation: prefill keeps the longest common prefix of what each cache holds and the new
    prompt (a chat's earlier turns) and feeds only the rest.

    Every forward pass of the target is a round for its experts: the decoder tells them when
    one ends (`end_round`), so they can plan and prefetch for the next while the draft runs."""

    def __init__(self, target: ModelRunner, draft: ModelRunner | None, sampler: Sampler,
                 experts: Experts | None = None, min_confidence: float = 0.0):
        """`experts`: the target's routed experts, told where each round ends. `min_confidence`:
        a round stops drafting after a token the draft gave less than this probability (its
        softmax, after the penalties), so the verify pass judges fewer likely rejections; the
        draft length then depends on the draft's own output only, so sampling stays exact."""
        self.target, self.draft, self.sampler, self.experts = target, draft, sampler, experts
        self.min_confidence = min_confidence
        self.stats = DecodeStats()
        self.tokens: list[int] = []
        self.prompt_length = 0

    def prefill(self, prompt: list[int], reuse: bool = False) -> int:
        """The first new token. `reuse` keeps what the caches share with the prompt; otherwise
        both start empty."""
        self.tokens, self.prompt_length = list(prompt), len(prompt)
        for runner in (self.target, self.draft):
            if runner and reuse:
                # At least the prompt's last token is fed: its logits give the first new token.
                runner.truncate(common_prefix(runner.tokens, self.tokens[:-1]))
            elif runner:
                runner.reset()
        self.stats.reused = self.target.length
        logits = self.target.forward(self.tokens[self.target.length:])[-1]
        self._end_round(draft_follows=self.draft is not None)
        return self._append(logits)

    def _append(self, logits: np.ndarray) -> int:
        token = self.sampler.pick(logits, self.tokens, self.prompt_length)
        self.tokens.append(token)
        return token

    def step(self, draft_len: int) -> list[int]:
        """One round: the new tokens (at least one). draft_len 0 (or no draft) is plain decoding."""
        if not self.draft or draft_len <= 0:
            logits = self.target.forward(self.tokens[self.target.length:])[-1]
            self._end_round(draft_follows=False)
            return [self._append(logits)]
        started = time.perf_counter()
        drafts, draft_probs = self._propose(draft_len)
        drafted = time.perf_counter()
        self.target.truncate(len(self.tokens) - 1)  # what a self-draft wrote into the shared cache
        new = self._verify(drafts, draft_probs)
        self.stats.draft_seconds += drafted - started
        self.stats.verify_seconds += time.perf_counter() - drafted
        self._end_round(drafts, drafted - started)
        self.tokens += new
        self.target.truncate(len(self.tokens) - 1)
        self.draft.truncate(min(self.draft.length, len(self.tokens) - 1))
        return new

    def _end_round(self, proposed: tuple[int, ...] | list[int] = (), draft_seconds: float = 0.0,
                   draft_follows: bool = True) -> None:
        if self.experts is not None:
            self.experts.end_round(proposed=proposed, draft_seconds=draft_seconds, draft_follows=draft_follows)

    def _propose(self, count: int):
        drafts, draft_probs = [], []
        feed = self.tokens[self.draft.length:]
        for _ in range(count):
            logits = self.draft.forward(feed)[-1]
            context = self.tokens + drafts  # the target judges this position with the same context
            if self.sampler.greedy:
                drafts.append(self.sampler.pick(logits, context, self.prompt_length))
            else:
                draft_probs.append(self.sampler.probs(logits, context, self.prompt_length))
                drafts.append(self.sampler.draw(draft_probs[-1]))
            if self.min_confidence and self._confidence(logits, context, drafts[-1]) < self.min_confidence:
                break
            feed = [drafts[-1]]
        return drafts, draft_probs

    def _confidence(self, logits: np.ndarray, context: list[int], token: int) -> float:
        """The draft's probability of the token it proposed (before temperature and filters)."""
        z = self.sampler.penalize(logits, context, self.prompt_length).astype(np.float64)
        return float(1.0 / np.exp(z - z[token]).sum())

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
            new.append(self._judge(token, rows[i], draft_probs[i] if draft_probs else None, self.tokens + new))
            if new[-1] != token:
                return new
            self.stats.accepted += 1
        # All accepted: the target adds one more.
        new.append(self.sampler.pick(rows[len(drafts)], self.tokens + new, self.prompt_length))
        return new

    def _judge(self, token: int, target_logits: np.ndarray, q: np.ndarray | None, context: list[int]) -> int:
        """The draft token if accepted, else the replacement token drawn by the target."""
        if q is None:
            return self.sampler.pick(target_logits, context, self.prompt_length)
        p = self.sampler.probs(target_logits, context, self.prompt_length)
        if self.sampler.rng.random() < min(1.0, p[token] / q[token]):
            return token
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        # total is 0 only if rounding made p <= q everywhere: then p itself is the right law.
        return self.sampler.draw(residual / total if total > 0 else p)


def common_prefix(first: list[int], second: list[int]) -> int:
    """How many leading tokens the two sequences share."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))
