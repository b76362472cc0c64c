"""Routed-expert execution for one MoE layer: group the batch's tokens by expert, run each
activated expert's subgraph on the execution provider its plan names, combine with the routing
weights. `Experts` is what the runtime asks of an expert stack: ResidentExperts (here) and
spac.ops.pager.PagedExperts implement it; spac.ops.self_draft.SelfDraftExperts drafts over one.

Sessions are created once (at load), never on the hot path: session creation costs tens of ms.
"""

from __future__ import annotations

import threading
from typing import Protocol, Sequence

import numpy as np

from . import fused_experts
from .expert_graph import build_expert_graph
from .sessions import COPIES_IN_MEMORY_FILES, IN_MEMORY, SessionFactory
from .stats import ExpertStats
from .storage import ExpertFiles


class Experts(Protocol):
    """An expert stack: runs a MoE layer's routed experts and hears where the rounds end."""

    policy: str  # the paging policy, or "resident"
    stats: ExpertStats  # since the last reset_stats()

    def run(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray,
            router_logits: np.ndarray | None = None) -> np.ndarray:
        """The routed experts' weighted sum for the rows of `x` ([T, hidden]). `router_logits`
        ([T, experts]) rank every expert, for a stack that substitutes one it does not hold."""

    def run_resident(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        """The same sum from the experts held in fast memory only, for a draft: never reads
        storage, counts nothing; an id < 0 is an empty slot, and an expert that is not held
        (any more) adds nothing."""

    def lookahead(self, layer: int, experts: Sequence[int]) -> None:
        """A draft wanted these experts of `layer` and did not have them: the next (verify) pass
        will, so they are the first to prefetch."""

    def end_round(self, proposed: Sequence[int] = (), draft_seconds: float = 0.0, draft_follows: bool = True) -> None:
        """A forward pass of the target ended (prefill, a plain decode step or a verify pass).
        `proposed`: the draft tokens that pass verified; `draft_seconds`: the draft's time;
        `draft_follows`: a draft runs before the next pass (False: plain decoding)."""

    def resident(self, layer: int) -> set[int]:
        """The experts of `layer` held in fast memory (host cache or device) right now."""

    def reset_stats(self) -> None:
        ...

    def close(self) -> None:
        ...


def group_by_expert(topk_ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """expert -> (token rows, top-k slots) of the tokens routed to it, in ascending expert order
    (the order transformers accumulates in, so sums round the same way)."""
    order = np.argsort(topk_ids, axis=None, kind="stable")
    experts = topk_ids.reshape(-1)[order]
    rows, slots = np.divmod(order, topk_ids.shape[1])
    bounds = np.flatnonzero(np.diff(experts)) + 1
    groups = {}
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
        groups[int(experts[start])] = (rows[start:stop], slots[start:stop])
    return groups


def weighted_sum(x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, compute) -> np.ndarray:
    """Σ over each row's routed experts of its weight × compute(expert, rows of x), in ascending
    expert order; ids < 0 are empty slots and compute() returning None adds nothing."""
    out = np.zeros_like(x)
    for expert, (rows, slots) in group_by_expert(topk_ids).items():
        y = compute(expert, x[rows]) if expert >= 0 else None
        if y is not None:
            out[rows] += y * topk_weights[rows, slots, None]
    return out


class ResidentExperts:
    """Every routed expert of the model held as its own in-graph-weights session (the fastest way
    to run an expert on ORT: weights inside the graph get MLAS prepacking). Used when the whole
    model fits the budget; the pager serves the case where it does not.

    With preload=False each expert's session is opened when it is routed to and dropped right
    after: the exporter's check runs beside the loaded transformers model and must not hold a
    second copy of every expert."""

    def __init__(self, manifest, sessions: SessionFactory, provider: str = "cpu", preload: bool = True,
                 progress=None, fuse: bool = True):
        """`progress(n)` is told of each expert loaded (a big model has thousands). Block-quantized
        experts on the CPU run as a QMoE session per layer where ONNX Runtime can
        (spac.ops.fused_experts), unless `fuse` is False."""
        self.manifest, self.factory, self.provider = manifest, sessions, provider
        self.policy = "resident"
        self.stats = ExpertStats()
        self.sessions = {}
        self.fused = {}  # layer -> FusedLayerExperts: block-quantized experts on the CPU, where QMoE runs
        if not preload:
            return
        experts = manifest.target.dims["num_experts"]
        fuse = fuse and provider == "cpu" and fused_experts.fusable(manifest, sessions)
        files = ExpertFiles(manifest) if fuse else None
        for layer in manifest.target.moe_layers:
            if fuse:
                self.fused[layer] = fused_experts.FusedLayerExperts(
                    manifest, sessions, lambda expert: files.read(layer, expert), progress)
                continue
            for expert in range(experts):
                self.sessions[layer, expert] = self._open(layer, expert)
                if progress:
                    progress(1)

    def _open(self, layer: int, expert: int):
        return self.factory.create(self.manifest.root / self.manifest.target.experts.path(layer, expert, ".onnx"),
                                   self.provider)

    def reset_stats(self) -> None:
        self.stats = ExpertStats()

    def resident(self, layer: int) -> set[int]:
        return set(range(self.manifest.target.dims["num_experts"])) if layer in self.manifest.target.moe_layers else set()

    def end_round(self, proposed: Sequence[int] = (), draft_seconds: float = 0.0, draft_follows: bool = True) -> None:
        """Nothing to do: every expert stays where it is."""

    def lookahead(self, layer: int, experts: Sequence[int]) -> None:
        """Nothing to fetch: every expert is held."""

    def close(self) -> None:
        self.sessions.clear()
        self.fused.clear()

    def run(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray,
            router_logits: np.ndarray | None = None) -> np.ndarray:
        out = self.run_resident(layer, x, topk_ids, topk_weights)
        self.count(topk_ids)
        return out

    def take_fused(self, layer: int):
        """The layer's FusedLayerExperts, or None, for the caller to join to the layer's trunk
        graph: this stack then runs that layer from a session per expert, opened as they are
        routed to (a self-draft over a resident stack computes what the target does, so the
        joined graph serves it too)."""
        return self.fused.pop(layer, None)

    def count(self, topk_ids: np.ndarray) -> None:
        """Counts a layer's expert calls (run() calls it; a trunk graph joined to the experts has
        its caller call it)."""
        self.stats.calls[self.provider] += topk_ids.shape[1] if len(topk_ids) == 1 else len(np.unique(topk_ids))
        self.stats.tokens[self.provider] += topk_ids.size

    def run_resident(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        if layer in self.fused:
            return self.fused[layer].run(x, topk_ids, topk_weights)
        if len(x) == 1:
            return self._run_one_token(layer, x, topk_ids[0], topk_weights[0])
        return weighted_sum(x, topk_ids, topk_weights,
                            lambda expert, rows: self._session(layer, expert).run(None, {"x": rows})[0])

    def _run_one_token(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Decode's case, without the grouping: a quarter of a decode step's Python time went there."""
        out = np.zeros_like(x)
        for slot in np.argsort(ids, kind="stable"):  # ascending expert order, as transformers sums
            if ids[slot] < 0:  # a draft's empty slot
                continue
            y = self._session(layer, int(ids[slot])).run(None, {"x": x})[0]
            y *= weights[slot]
            out += y
        return out

    def _session(self, layer: int, expert: int):
        return self.sessions.get((layer, expert)) or self._open(layer, expert)


# A prepared expert (ExpertKernel.prepare) is a session holding MLAS's prepacked copy of the
# block-quantized weights and, where ONNX Runtime cannot copy them (see
# sessions.COPIES_IN_MEMORY_FILES), the weights too. Measured as the resident-set growth over 7
# sessions (ONNX Runtime 1.32, int4 and int8, 1-18 MB experts): 1.40-1.44x the expert's bytes
# when copied (FACTOR_COPIED counts more: 1 MB experts measured 1.7x), 2.35-2.67x when kept
# (FACTOR_KEPT), plus 0.2 MB a session. A memory limit counts them at
# the high end; the limit's margin absorbs the rest. Creating a session holds, for a moment,
# the read bytes and ORT's copy of them beside it (PREPARING_BYTES_FACTOR); PREPARED_AT_ONCE
# are created at a time: one at a time made paged int4 decode 15 % slower (its misses' preparing
# no longer overlapped), two are as fast as no bound on 2 cores.
PREPARED_AT_ONCE = 2
FACTOR_COPIED, FACTOR_KEPT = 1.8, 2.75
PREPARED_BYTES_FACTOR = FACTOR_COPIED if COPIES_IN_MEMORY_FILES else FACTOR_KEPT
PREPARING_BYTES_FACTOR = 2.0 if COPIES_IN_MEMORY_FILES else 0.0
PREPARED_SESSION_BYTES = 1 << 18


def prepares_sessions(manifest, provider: str = "cpu", device_tier: bool = False) -> bool:
    """Whether a paged expert is kept as a session of its own (see ExpertKernel.prepare):
    block-quantized weights on the CPU, with no device tier copying plain weights."""
    return manifest.target.experts.quantization is not None and provider == "cpu" and not device_tier


def cached_expert_bytes(manifest, prepared: bool) -> int:
    """The memory one paged expert takes while held: its weights, or its prepared session."""
    stored = manifest.target.experts.bytes_per_expert
    return int(PREPARED_BYTES_FACTOR * stored) + PREPARED_SESSION_BYTES if prepared else stored


def preparing_bytes(manifest, prepared: bool) -> int:
    """What creating prepared sessions holds beyond them, for a moment (ExpertKernel.prepare
    creates PREPARED_AT_ONCE at a time)."""
    return PREPARED_AT_ONCE * int(PREPARING_BYTES_FACTOR * manifest.target.experts.bytes_per_expert) if prepared else 0


class ExpertKernel:
    """Computes any expert of the model from weights passed as inputs: one session per provider
    serves every expert, so paged-in weights need no session of their own. On CUDA the weights
    are device-resident OrtValues bound with IOBinding; activations cross as host arrays.

    Block-quantized weights are the exception on the CPU: MatMulNBits is fast only on weights
    ONNX Runtime prepacks, which it does for initializers alone (int4, hidden 2048 x 768, one
    token: 0.2-0.35 ms as initializers, about 7 ms as inputs). So `prepare` turns a quantized
    expert's weights into a session of its own with them as initializers (10-40 ms, on the
    prefetch worker when the expert was prefetched), and the host cache keeps that session."""

    def __init__(self, manifest, sessions: SessionFactory, provider: str = "cpu", prepared: bool = True):
        """`prepared`: quantized experts get sessions of their own (False: the host cache keeps
        plain weights, which a device tier copies from)."""
        dims = manifest.target.dims
        experts = manifest.target.experts
        graph = build_expert_graph(experts.spec, dims["hidden_size"], dims["expert_intermediate_size"],
                                   manifest.dtype, data_file=None, quantization=experts.quantization)
        self.provider, self.factory = provider, sessions
        self.preparing = threading.Semaphore(PREPARED_AT_ONCE)
        self.session = sessions.create(graph.SerializeToString(), provider)
        # The graph of a prepared expert: the weights are initializers, given from memory.
        self.prepared_graph = (build_expert_graph(experts.spec, dims["hidden_size"], dims["expert_intermediate_size"],
                                                  manifest.dtype, data_file=IN_MEMORY, quantization=experts.quantization
                                                  ).SerializeToString()
                               if prepared and prepares_sessions(manifest, provider) else None)

    def to_device(self, weights: dict[str, np.ndarray]) -> dict:
        """The weights in this kernel's memory: host arrays as they are, or copies on the GPU."""
        if self.provider == "cpu":
            return weights
        import onnxruntime as ort

        return {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for name, value in weights.items()}

    def prepare(self, weights: dict[str, np.ndarray]):
        """What the host cache keeps of an expert: its weights, or for block-quantized weights on
        the CPU a session holding them as (prepacked) initializers."""
        if self.prepared_graph is None:
            return weights
        with self.preparing:  # a bounded number at once: their moment of ORT's copy is counted (preparing_bytes)
            return self.factory.create(self.prepared_graph, self.provider, initializers=weights)

    def run(self, x: np.ndarray, weights) -> np.ndarray:
        """The expert on x, from its weights or what `prepare` made of them."""
        if not isinstance(weights, dict):
            return weights.run(None, {"x": x})[0]
        if self.provider == "cpu":
            return self.session.run(None, {"x": x, **weights})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input("x", x)
        for name, value in weights.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("y", "cpu")
        self.session.run_with_iobinding(binding)  # no RunOptions: its error path costs ~30 us
        return binding.copy_outputs_to_cpu()[0]
