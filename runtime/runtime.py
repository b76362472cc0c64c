"""Runtime: load a spac package with a device profile and generate text.

    with Runtime("packages/qwen3-moe", profile="cpu-only") as rt:
        print(rt.generate("def fib(n):", max_new_tokens=64).text)
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from spac.ops.experts import cached_expert_bytes, prepares_sessions
from spac.ops.pager import PagedExperts
from spac.ops.providers import PROVIDERS
from spac.ops.self_draft import SelfDraftExperts
from spac.ops.stats import DraftExpertStats
from spac.ops.sessions import SessionFactory, cuda_available

from .chat import chat_prompt
from .expert_stack import (ExpertOptions, build_draft_copies, build_experts, draft_copies_bytes, host_budget_bytes,
                           pages_on_host, verify_trunk)
from .manifest import Manifest, load_manifest
from .memory import (MemoryLimitError, MemoryPlan, kv_cache_bytes, plan_memory, resolve_limit,
                     return_freed_buffers_to_the_kernel)
from .model import ModelRunner
from .profile import load_profile
from .routing import RoutingCounts, checked_frequencies
from .speculative import DRAFT_MODES, Decoder, Sampler
from .stats import GenerationStats
from .tokenizer import TextTokenizer

log = logging.getLogger("spac")


class GenerationError(ValueError):
    """A request the runtime cannot serve (bad prompt length, bad max_new_tokens...)."""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats | None = None  # None until the generation has ended
    interrupted: bool = False


class Generation:
    """What Runtime.stream() returns: an iterator of text pieces and, in `result`, this
    generation's own result, filled in as the pieces come (its stats once it has ended)."""

    def __init__(self, result: GenerationResult, pieces: Iterator[str]):
        self.result, self._pieces = result, pieces

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Ends the generation early; its stats are filled in."""
        self._pieces.close()


def choose_draft(manifest, draft: str | None, pages: bool = False, memory_limited: bool = False) -> str:
    """The draft mode: `draft` checked against the package, or by default its draft model if it
    has one; else self-drafting where it was measured to pay: from the package's draft copies of
    its experts, with experts read from storage (`pages`) and no memory limit, which would take
    the copies' room from the host cache; else none. (Measured, README's results: from copies at
    host budgets of 17-45 % self SD decoded 1.02-1.78x the target alone at γ 4, 1.81-2.02x at
    25 % and γ 8; with every expert resident 0.62-0.88x; under a memory cap that holds the
    copies too, 0.85-0.97x the target alone; without copies it was slower than the target alone
    at every budget.)"""
    if draft is None:
        if manifest.draft is not None:
            return "model"
        copies = manifest.target.draft_experts is not None
        return "self" if copies and pages and not memory_limited else "none"
    if draft not in DRAFT_MODES:
        raise ValueError(f"unknown draft mode {draft!r}; valid: {', '.join(DRAFT_MODES)}")
    if draft == "model" and manifest.draft is None:
        raise ValueError(f"the package {manifest.root} has no draft model (exported without --draft); "
                         "valid here: self, none")
    return draft


def choose_provider(profile, providers: list[str] | None, strict: bool) -> str:
    """The EP experts run on: the first of `providers` (or the profile's) that this machine has."""
    wanted = providers or [spec.name for spec in profile.providers]
    unknown = [name for name in wanted if name not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; valid: {', '.join(map(repr, PROVIDERS))}")
    if "cuda" in wanted and not cuda_available():
        message = "CUDA was requested but CUDAExecutionProvider is not available (install onnxruntime-gpu"
        if strict:
            raise RuntimeError(message + "); not falling back because strict=True")
        log.warning("%s); falling back to the CPU", message)
        return "cpu"
    return wanted[0]


class Runtime:
    def __init__(self, package, profile: str = "cpu-only", draft_len: int | None = None,
                 providers: list[str] | None = None, strict: bool = False, threads: int | None = None,
                 policy: str | None = None, host_budget: float | int | None = None, estimator: str | None = None,
                 static_frequencies=None, global_thread_pool: bool = False, device_tier: str | None = None,
                 draft: str | None = None, min_draft_confidence: float = 0.0,
                 memory_limit: int | str | None = None, direct_io: bool = True, layer_lookahead: bool = False):
        """`package`: a package folder, or its Manifest (spac.runtime.manifest.load_manifest) when
        the caller has loaded it already. `policy`, `host_budget` (a fraction of the expert bytes,
        or bytes) and `estimator` override the profile's; `static_frequencies` (routing counts
        from an earlier run: a file that spac-run --save-routing or count_routing() wrote, or a
        [layer, expert] array) choose the `static` policy's resident set (spac.runtime.routing).
        `global_thread_pool` shares one ORT thread pool across all sessions: faster, but every
        other ORT session in the process must then be made with use_per_session_threads=False
        (see spac.ops.sessions).
        `device_tier="cpu"` runs the device tier (slots, balancer plans) on the CPU EP, to
        exercise it without a GPU (see spac.runtime.expert_stack.ExpertOptions). `draft` is what
        drafts (DRAFT_MODES): "model", the package's draft model (the default when it has one,
        unless `memory_limit` leaves room for fewer than all experts: see _pages_under);
        "self", the target drafting from the package's draft copies of its experts where it has
        them, else with only the experts it holds (spac.ops.self_draft; the default for a package
        with copies and no draft model whose experts are paged, without `memory_limit`, see
        choose_draft); "none".
        `min_draft_confidence` ends a round's drafting after a token the draft was less sure of
        (spac.runtime.speculative.Decoder). `memory_limit` (bytes, or "auto": the cgroup's
        limit, else MemAvailable) sizes the host cache so that the whole process stays inside
        it, overriding `host_budget` (see spac.runtime.memory). `direct_io` (the default) reads
        expert files with O_DIRECT (spac.ops.direct_io), past the page cache, through the same
        integrity checks (False: buffered reads, each file dropped from the page cache after);
        `layer_lookahead` (spac policy) reads the experts the next layers' routers guess from the
        current hidden state while the current layer computes (spac.ops.lookahead)."""
        self.manifest = package if isinstance(package, Manifest) else load_manifest(package)
        self.tokenizer = TextTokenizer(self.manifest)  # before the sessions: a bad tokenizer fails fast
        self.profile = load_profile(profile)
        self.profile.validate_for_package(self.manifest.trunk_bytes(), self.manifest.expert_bytes_total())
        static_frequencies = checked_frequencies(static_frequencies, self.manifest)  # a bad file fails before loading
        pages = pages_on_host(self.manifest, host_budget_bytes(self.manifest, self.profile, host_budget))
        self.draft_mode = choose_draft(self.manifest, draft, pages, memory_limited=memory_limit is not None)
        if draft_len is None:
            draft_len = self.profile.self_draft_len if self.draft_mode == "self" else self.profile.draft_len
        if draft_len < 0:
            raise ValueError(f"draft_len must be >= 0, got {draft_len}")
        self.draft_len = draft_len
        if not 0.0 <= min_draft_confidence <= 1.0:
            raise ValueError(f"min_draft_confidence must be in [0, 1], got {min_draft_confidence}")
        self.min_draft_confidence = min_draft_confidence
        if self.draft_mode == "none":
            self.draft_len = 0
        self.provider = choose_provider(self.profile, providers, strict)
        self.sessions = SessionFactory(threads or self.profile.threads, global_pool=global_thread_pool,
                                       provider_options=self.profile.provider_options())
        verify_trunk(self.manifest)
        # The trunk and a draft model run where the profile puts them: on the GPU when there is
        # one. They load before the experts, so that a memory limit can count what they take.
        self.target = ModelRunner(self.manifest, self.manifest.target, self.sessions, provider=self.provider)
        self.context = self.manifest.target.dims["max_position_embeddings"]
        limit = None if memory_limit is None else resolve_limit(memory_limit)
        if (draft is None and self.draft_mode == "model" and limit is not None
                and self._pages_under(limit, device_tier is not None, policy)):
            log.info("memory limit %.0f MB pages the experts: decoding without the draft model, which is faster "
                     "there (--draft model, in Python draft='model', drafts all the same)", limit / 1e6)
            self.draft_mode, self.draft_len = "none", 0
        self.draft = (ModelRunner(self.manifest, self.manifest.draft, self.sessions, provider=self.provider)
                      if self.draft_mode == "model" else None)
        if limit is not None:
            return_freed_buffers_to_the_kernel()
        # A self-draft drafts from the package's draft copies of the experts where it has them:
        # held in memory, and loaded here so that a memory limit measures them (a limit they
        # would not fit is refused first, from their expected size).
        copies = self.draft_mode == "self" and self.manifest.target.draft_experts is not None
        if copies and limit is not None:
            self._plan_memory(limit, device_tier is not None, policy, loading=draft_copies_bytes(self.manifest))
        self.draft_copies = build_draft_copies(self.manifest, self.sessions, self.provider) if copies else None
        self.memory = None
        if limit is not None:
            self.memory = self._plan_memory(limit, device_tier is not None, policy)
            # The pager counts its budget in expert bytes as stored; the plan, in slots as held.
            host_budget = self.memory.cache_slots * self.manifest.target.experts.bytes_per_expert
        options = ExpertOptions(policy, host_budget, estimator, static_frequencies, self.provider, device_tier,
                                direct_io=direct_io, layer_lookahead=layer_lookahead,
                                plain_decoding=self.draft_mode == "none")
        self.experts = self.target.experts = build_experts(self.manifest, self.profile, self.sessions, options)
        self.target.join_experts()
        # A Runtime dropped without close() stops its reader and prefetch threads all the same.
        self._finalizer = weakref.finalize(self, self.experts.close)
        if self.draft_mode == "self":  # the target's twin over the experts it holds: no sessions or KV of its own
            self.draft = self.target.twin(SelfDraftExperts(self.experts, self.manifest.target.dims["num_experts"],
                                                           copies=self.draft_copies))
        self.last_result: GenerationResult | None = None
        # One generation at a time: the KV caches, the expert cache and the stats are the
        # Runtime's, so two interleaved generations would corrupt each other's tokens.
        self._lock = threading.Lock()
        self._generating_thread: int | None = None

    def _pages_under(self, limit: int, device_tier: bool, policy: str | None) -> bool:
        """Whether `limit` leaves the host cache fewer slots than the package has experts once the
        draft model (about to load: its files' bytes) is counted too. Under such a limit a verify
        pass of γ + 1 tokens routes to more distinct experts per token it yields than one-token
        decoding does: on the memory testbed (README, A model larger than memory) spac without SD
        decoded 1.31-1.73x spac+SD at caps of 30-75 %, the draft's acceptance 43 %."""
        draft_files = set(self.manifest.draft.graphs)
        loading = sum(entry["bytes"] for name, entry in self.manifest.files.items()  # a graph, or its external data
                      if name.removesuffix(".data") in draft_files)
        try:
            plan = self._plan_memory(limit, device_tier, policy, loading)
        except MemoryLimitError:
            return True  # (the plan made once the draft mode is settled says what it needs)
        return pages_on_host(self.manifest, plan.cache_slots * self.manifest.target.experts.bytes_per_expert)

    def _plan_memory(self, limit: int, device_tier: bool, policy: str | None, loading: int = 0) -> MemoryPlan:
        """The host cache's share of `limit` once the loaded trunk and draft model, the KV caches
        (a self-draft writes into the target's own) and the read buffers `policy` (None: the
        profile's) needs are counted, each expert as the pager will hold it (block-quantized
        ones on the CPU: as sessions)."""
        itemsize = np.dtype(self.target.dtype).itemsize
        sections = (self.manifest.target, self.manifest.draft if self.draft_mode == "model" else None)
        kv = sum(kv_cache_bytes(section, self.context, itemsize) for section in sections if section is not None)
        prepared = prepares_sessions(self.manifest, self.provider, device_tier)
        buffers = PagedExperts.read_buffers(self.manifest, prepared, policy or self.profile.policy,
                                            plain_decoding=self.draft_mode == "none")
        plan = plan_memory(limit, kv, buffers,
                           cached_expert_bytes(self.manifest, prepared), loading)
        log.info("memory limit %.0f MB: %s", limit / 1e6, plan.as_dict())
        return plan

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count_routing(self) -> RoutingCounts:
        """Counts, from now on, every expert the target's router picks (RoutingCounts.save writes
        them for a later run's static policy: spac-run --save-routing)."""
        counts = RoutingCounts.empty(self.manifest)
        self.target.on_routing = counts.add
        return counts

    def close(self) -> None:
        """Stop the prefetch worker and release the sessions and expert weights."""
        self._finalizer()  # closes the experts, once
        self.experts = self.target = self.draft = self.draft_copies = None

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: list[str] | None = None, speculative: bool = True,
                 **options) -> GenerationResult:
        """Takes stream()'s arguments and returns the whole result. Safe to call from several
        threads: calls on one Runtime run one after the other, each with its own result."""
        generation = self.stream(prompt, max_new_tokens, temperature, top_p, seed, stop, speculative, **options)
        for _ in generation:
            pass
        return generation.result

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: list[str] | None = None, speculative: bool = True, *,
               reuse_cache: bool = False, cancel=None, **sampling) -> Generation:
        """Yields text pieces as tokens are accepted; the returned Generation's `result` holds
        the whole result (`last_result` too, but another thread's generation may replace that).
        On KeyboardInterrupt the partial result is kept and the runtime stays usable.
        A bad request raises here, not at the first piece.

        Sampling options left None (temperature, top_p and `sampling`'s top_k, min_p,
        repetition_penalty, frequency_penalty, presence_penalty) take the model's
        generation_config defaults, else greedy. `reuse_cache` keeps the KV cache's common prefix
        with the previous sequence (a chat's earlier turns); `cancel()` returning True ends the
        generation after the current round. Generations on one Runtime run one at a time (a
        stream holds the Runtime from its first piece until it ends or is closed)."""
        self._check_open()
        prompt_ids = self._check_request(prompt, max_new_tokens)
        sampler = Sampler.from_options(self.generation_defaults, seed, temperature=temperature, top_p=top_p,
                                       **sampling)
        result = GenerationResult("", [])
        return Generation(result, self._pieces(result, prompt_ids, max_new_tokens, sampler, stop, speculative,
                                               reuse_cache, cancel))

    def _check_open(self) -> None:
        if self.target is None:
            raise RuntimeError("this Runtime is closed")

    @contextmanager
    def _exclusive(self):
        """Hold the Runtime for one generation; waits for another thread's to end."""
        if self._generating_thread == threading.get_ident():  # waiting would never end
            raise RuntimeError("this thread is already generating with this Runtime: finish or close() "
                               "that stream before starting another")
        with self._lock:
            self._generating_thread = threading.get_ident()
            try:
                self._check_open()  # closed while this call waited
                yield
            finally:
                self._generating_thread = None

    def chat(self, messages: list[dict], system: str | None = None, add_generation_prompt: bool = True,
             template_kwargs: dict | None = None, **options) -> GenerationResult:
        """Generates the next turn of a conversation, reusing the KV cache of the turns the
        previous call already saw. `template_kwargs` go to the chat template (e.g.
        enable_thinking=False for Qwen3); `options` are generate()'s."""
        ids = chat_prompt(self.tokenizer, messages, system, add_generation_prompt, template_kwargs)
        return self.generate(ids, reuse_cache=True, **options)

    @property
    def generation_defaults(self) -> dict:
        """The model's generation_config.json sampling values, as the exporter carried them."""
        return self.manifest.tokenizer.get("generation") or {}

    def _pieces(self, result: GenerationResult, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler, stop,
                speculative: bool, reuse_cache: bool = False, cancel=None):
        with self._exclusive():
            self.last_result = result
            yield from self._generate(result, prompt_ids, max_new_tokens, sampler, stop, speculative, reuse_cache,
                                      cancel)

    def _generate(self, result: GenerationResult, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                  stop, speculative: bool, reuse_cache: bool, cancel):
        limit = min(max_new_tokens, self.context - len(prompt_ids))
        decoder = Decoder(self.target, self.draft if speculative else None, sampler, self.experts,
                          self.min_draft_confidence)
        draft_len = self.draft_len if speculative else 0
        text = _TextAssembler(self.tokenizer, stop or [])
        self.experts.reset_stats()  # stats are per generation; cached experts stay
        if self.draft_mode == "self":
            self.draft.experts.reset_stats()
        started = time.perf_counter()
        prefill_seconds = None
        generated: list[int] = []
        try:
            new = [decoder.prefill(prompt_ids, reuse=reuse_cache)]
            prefill_seconds = time.perf_counter() - started
            while True:
                done = self._admit(new, generated, limit)
                piece = text.add(generated, final=done)
                result.text, result.token_ids = text.text, list(generated)
                if piece:
                    yield piece
                if done or text.stopped:
                    break
                if cancel is not None and cancel():
                    result.interrupted = True
                    break
                new = decoder.step(min(draft_len, limit - len(generated) - 1))
        except KeyboardInterrupt:
            result.interrupted = True
            raise
        finally:
            result.stats = self._stats(decoder, started, prefill_seconds, len(generated), len(prompt_ids))

    def _admit(self, new: list[int], generated: list[int], limit: int) -> bool:
        """Append new tokens up to the limit and the first end-of-sequence token; True when done."""
        for token in new:
            generated.append(token)
            if token in self.tokenizer.eos_token_ids:
                return True
            if len(generated) >= limit:
                return True
        return False

    def _check_request(self, prompt, max_new_tokens: int) -> list[int]:
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        prompt_ids = self.tokenizer.encode_prompt(prompt)
        if not prompt_ids:
            raise GenerationError("the prompt is empty")
        if len(prompt_ids) >= self.context:
            raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context} "
                                  "tokens, which must also hold at least one new token")
        return prompt_ids

    def _stats(self, decoder: Decoder, started: float, prefill_seconds, new_tokens: int,
               prompt_tokens: int) -> GenerationStats:
        total = time.perf_counter() - started
        prefill = prefill_seconds if prefill_seconds is not None else total
        return GenerationStats(
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, prefill_seconds=prefill,
            decode_seconds=total - prefill, decoded_tokens=max(0, new_tokens - 1), decode=decoder.stats,
            draft_len=self.draft_len if decoder.draft else 0, experts=self.experts.stats,
            policy=self.experts.policy, provider=self.provider, draft=self.draft_mode if decoder.draft else "none",
            draft_experts=self.draft.experts.stats if self.draft_mode == "self" else DraftExpertStats())


class _TextAssembler:
    """Turns the growing token list into text pieces; holds back an incomplete UTF-8 character
    and anything that could still become a stop string."""

    def __init__(self, tokenizer: TextTokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.text, self.emitted, self.stopped = "", 0, False

    def add(self, ids: list[int], final: bool = False) -> str:
        """The next piece of text; `final` (no more tokens will come) releases what was held back."""
        full = self.tokenizer.decode(ids)
        for marker in self.stop:
            cut = full.find(marker)
            if cut >= 0:
                full, self.stopped = full[:cut], True
        self.text = full
        safe = len(full) if self.stopped or final else self._safe_length(full)
        piece, self.emitted = full[self.emitted:safe], max(self.emitted, safe)
        return piece

    def _safe_length(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        for marker in self.stop:  # a suffix that starts a stop string may not be shown yet
            for size in range(min(len(marker) - 1, end), 0, -1):
                if text[:end].endswith(marker[:size]):
                    end -= size
                    break
        return end


