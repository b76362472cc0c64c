"""Routed-expert execution from tiers under byte budgets: storage (spac.ops.storage) -> host
RAM (spac.ops.host_cache, filled ahead by spac.ops.prefetcher) -> device slots
(spac.ops.device_slots), one MoE layer at a time.

A routed expert that is not cached is never a wrong result: it is computed on the CPU from
weights read for the occasion (`lru` admits them into the cache, evicting the least recently
used; `static` and `spac` admit them only when they outrank the cache's weakest slot).

The caller says when a forward pass ends (`end_round`): utilities are then updated, the next
round's prefetches queued and the balancer's next plan requested, all while the draft runs.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .device_slots import DeviceSlots
from .direct_io import read_buffer
from .experts import ExpertKernel, cached_expert_bytes, group_by_expert, preparing_bytes, weighted_sum
from .host_cache import HostCache, PassPosition
from .prefetcher import Prefetcher
from .read_pool import ReadPool, result
from .stats import ExpertStats, PagingStats
from .storage import ExpertFiles

READ_THREADS = 4  # parallel storage reads of one layer's misses (NVMe wants several in flight)
# A miss the cache will keep is read into the room its victim left (HostCache.make_room); one
# it will not keep needs a buffer of its own. lru keeps every miss, so only one that finds no
# victim reads without a room, and only this many of those are read ahead of the one computed.
# static keeps none and spac few (a miss must outrank a slot): theirs read ahead as many as any
# miss. At a 45 % cap on the memory testbed (bench_memory's worker) lru then holds 16 cache
# slots instead of 13; spac+SD with 1 / 2 / 4 such reads ahead (17 / 16 / 14 slots) decoded
# 7.36 / 7.65 / 8.34 tok/s, its storage reading 1.20 / 1.54 / 2.37 experts at a time.
OUTSIDE_READS_AHEAD = 1
# A read ahead of a prepared expert holds its session (see experts.cached_expert_bytes)
# and creating it is CPU work, which the cores bound rather than the storage queue.
PREPARED_READS_AHEAD = 2
# A draft's lookahead outranks every utility: the verify pass will route to these experts. Once
# cached they are not given up for another prefetch until the next round's utilities come.
LOOKAHEAD_UTILITY = float("inf")


class PagedExperts:
    """Routed-expert execution from a budgeted host cache (an `Experts`, as ResidentExperts)."""

    def __init__(self, manifest, sessions, budget_bytes: int, policy: str = "spac", estimator=None,
                 frequencies: np.ndarray | None = None, verify=None, device: DeviceSlots | None = None,
                 planner=None, reader=None, layer_lookahead=None, plain_decoding: bool = False):
        """`device` is the GPU tier and `planner` the workload balancer (plan_for(layer, counts,
        resident, free_slots) -> LayerPlan); without them every expert runs on the CPU. `reader`
        reads whole expert files (spac.ops.direct_io.DirectReader; None: pread);
        `layer_lookahead` (spac.ops.lookahead.Lookahead, with the spac policy) reads the experts
        the next layers' routers guess early; `plain_decoding`: the runtime never drafts, so its
        passes after the prefill hold one token (see outside_reads_ahead)."""
        if policy == "spac" and estimator is None:
            raise ValueError("the spac policy needs a utility estimator")
        self.policy, self.estimator = policy, estimator
        self.moe_layers = manifest.target.moe_layers
        self.num_experts = manifest.target.dims["num_experts"]
        self.expert_bytes = manifest.target.experts.bytes_per_expert
        self.capacity = max(0, budget_bytes // self.expert_bytes)  # slots
        self.files = ExpertFiles(manifest, verify, reader)
        self.kernel = ExpertKernel(manifest, sessions, prepared=device is None)
        prepared = self.kernel.prepared_graph is not None
        self.reads_ahead = self.misses_read_ahead(prepared)
        self.outside_ahead = self.outside_reads_ahead(policy, prepared, manifest.target.dims["top_k"], plain_decoding)
        self.stats = ExpertStats(paging=PagingStats())
        self.position = PassPosition()
        self.host = HostCache(policy, self.capacity, self.position, self.stats.paging)
        self.counts = np.zeros((max(self.moe_layers) + 1, self.num_experts), dtype=np.int64)
        self.routing_totals = np.zeros_like(self.counts)
        self.readers = ReadPool(READ_THREADS, "spac-read")
        self.reads_in_flight, self.busy_since = 0, 0.0  # for the storage's busy time (PagingStats)
        # Buffers of misses read outside the cache, computed and not kept: the next such read lands
        # in one (its pages faulted in already). No more are kept than read_buffers counts.
        self.spare_outside: list[memoryview] = []
        self.outside_buffers = self.outside_ahead + 1
        if policy == "static":
            self.host.fill_static(lambda layer, expert: self.kernel.prepare(self.files.read(layer, expert)),
                                  frequencies, self.moe_layers, self.num_experts)
        self.device, self.planner = device, planner
        self.prefetcher = (Prefetcher(self.host, self._fetch, self.position, self.stats.paging)
                           if policy == "spac" and self.capacity else None)
        self.looked_ahead: set[tuple[int, int]] = set()  # asked for by this round's draft
        self.layer_lookahead = layer_lookahead if self.prefetcher is not None else None

    @staticmethod
    def misses_read_ahead(prepared: bool) -> int:
        """How many of a layer's misses are read (and prepared) ahead of the one computed."""
        return PREPARED_READS_AHEAD if prepared else READ_THREADS

    @staticmethod
    def outside_reads_ahead(policy: str, prepared: bool, top_k: int, plain_decoding: bool = False) -> int:
        """How many misses without a room in the cache are read ahead of the one computed (see
        OUTSIDE_READS_AHEAD). In plain decoding (`plain_decoding`: no draft) a pass of one token
        has at most top_k misses a layer, so no more than top_k - 1 are ever read ahead then, and
        no more are counted; a prefill then reads fewer ahead."""
        ahead = OUTSIDE_READS_AHEAD if policy == "lru" else PagedExperts.misses_read_ahead(prepared)
        return max(1, min(ahead, top_k - 1)) if plain_decoding else ahead

    @staticmethod
    def read_buffers(manifest, prepared: bool, policy: str, plain_decoding: bool = False) -> int:
        """The most experts held outside the cache's slots at once: the misses without a room
        read ahead and the one being computed (a miss with a room, and every prefetch, is read
        into a slot); each as the kernel holds it (`prepared`: as a session), and the sessions
        being created. A self-draft computes from the cache only and adds none. The buffers of
        dropped misses kept for later reads (spare_outside) are among these: a read without a
        room takes one of them before it makes a fresh one."""
        outside = PagedExperts.outside_reads_ahead(policy, prepared, manifest.target.dims["top_k"], plain_decoding) + 1
        return outside * cached_expert_bytes(manifest, prepared) + preparing_bytes(manifest, prepared)

    def reset_stats(self) -> None:
        self.stats = ExpertStats(paging=PagingStats())
        self.host.paging = self.stats.paging
        if self.prefetcher is not None:
            self.prefetcher.paging = self.stats.paging

    def resident(self, layer: int) -> set[int]:
        """The layer's experts in the host cache or a device slot."""
        on_device = self.device.resident(layer) if self.device else set()
        return self.host.layer_experts(layer) | on_device

    # --- the critical path -------------------------------------------------------------------

    def anticipate(self, layer: int, hidden: np.ndarray, distance: int) -> None:
        """`hidden` ([T, H]) is the residual stream `distance` layers before MoE layer `layer`'s
        input: queue reads of the experts its router would pick from it. A guess ranks by its
        expert's utility plus its share of the batch, so it evicts only slots worth less."""
        if self.layer_lookahead is None:
            return
        utilities = self.estimator.utilities()
        wanted = [((layer, expert), float(utilities[layer, expert]) + share)
                  for expert, share in self.layer_lookahead.guess(layer, hidden, distance)
                  if (layer, expert) not in self.host]
        self.layer_lookahead.read_early += len(wanted)
        self.prefetcher.add(wanted)

    def run(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray,
            router_logits: np.ndarray | None = None) -> np.ndarray:
        if self.prefetcher is not None:
            self.prefetcher.raise_error()
        self.position.layer = layer
        paging = self.stats.paging
        groups = group_by_expert(topk_ids)
        if self.layer_lookahead is not None:
            self._score_guesses(layer, set(groups))
        for expert, (rows, _) in groups.items():
            self.counts[layer, expert] += len(rows)
        plan = self._plan(layer) if self.planner and self.device else None
        on_device = plan.gpu if plan else frozenset()
        # The whole layer's routing is known before any expert runs (with SD, γ+1 tokens' worth),
        # so every miss is read at once, in parallel, while the cached experts compute.
        gpu = {expert for expert in groups if expert in on_device and self._on_device((layer, expert))}
        weights, misses = {}, []
        for expert in sorted(groups.keys() - gpu):
            weights[expert] = self.host.get((layer, expert))
            if weights[expert] is None:
                paging.host_misses += 1
                misses.append(expert)
        # At most reads_ahead misses are read ahead of the one being computed, into the rooms
        # their victims leave; of those without a room only outside_ahead, and a miss the cache
        # does not keep is dropped once computed (the memory limit counts those, see read_buffers).
        reads, rooms = {}, set()
        for expert in misses[:self.reads_ahead]:
            self._read_ahead(layer, expert, reads, rooms)
        outputs = {}
        for expert, (rows, _) in groups.items():
            if expert in gpu:
                outputs[expert] = (self.device.run((layer, expert), x[rows]), self.device.kernel.provider)
            elif expert not in misses:
                outputs[expert] = (self.kernel.run(x[rows], weights[expert]), "cpu")
                if not plan:  # a miss may evict it (lru): then this reference alone would keep it
                    weights[expert] = None
        try:
            for index, expert in enumerate(misses):
                started = time.perf_counter()
                read = reads.pop(expert, None) or self.readers.submit(self._fetch, layer, expert)
                buffer = result(read, self.files.path(layer, expert))
                paging.stall_seconds += time.perf_counter() - started
                if index + self.reads_ahead < len(misses):
                    self._read_ahead(layer, misses[index + self.reads_ahead], reads, rooms)
                kept = self._admit((layer, expert), buffer)
                rooms.discard(expert)
                outputs[expert] = (self.kernel.run(x[groups[expert][0]], buffer), "cpu")
                # Only the device plan needs the weights again; holding a kept miss would outlive its
                # slot when a later miss of this layer evicts it (lru), past what read_buffers counts.
                weights[expert] = buffer if plan else None
                if not kept and not plan:
                    self._spare(buffer)
        finally:  # a failed read leaves the rooms of the misses not yet admitted: give them back
            for expert in rooms:
                self.host.give_up_room((layer, expert))
        out = np.zeros_like(x)
        for expert, (rows, slots) in groups.items():  # ascending expert order, as transformers sums
            y, provider = outputs[expert]
            out[rows] += y * topk_weights[rows, slots, None]
            self.stats.calls[provider] += 1
            self.stats.tokens[provider] += len(rows)
        if plan:
            self._prefetch_to_device(layer, plan.prefetch, weights)
        self.position.computed.add(layer)  # evict-first from now until the next round's utilities
        return out

    def _read_ahead(self, layer: int, expert: int, reads: dict, rooms: set) -> None:
        """Start reading a miss ahead of its turn: into a room the cache makes for it, else into
        a buffer of its own while fewer than outside_ahead such reads are under way (else it is
        read at its turn)."""
        if self.host.make_room((layer, expert), self._utility((layer, expert))):
            rooms.add(expert)
        elif len(reads) - len(rooms & reads.keys()) >= self.outside_ahead:
            return
        reads[expert] = self.readers.submit(self._fetch, layer, expert)

    def _score_guesses(self, layer: int, routed: set[int]) -> None:
        for expert in self.layer_lookahead.score(layer, routed) - routed:
            slot = self.host.slots.get((layer, expert))
            if slot is not None and slot.prefetched:  # read early and, this pass, for nothing
                self.layer_lookahead.wasted_bytes += self.expert_bytes

    def run_resident(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        """A draft's sum from device slots and the host cache only; an expert the prefetcher has
        evicted since the draft looked adds nothing. Not counted: the target's stats stay its own."""

        def compute(expert: int, rows: np.ndarray):
            key = (layer, expert)
            if self.device is not None and key in self.device.slots:
                return self.device.run(key, rows)
            weights = self.host.peek(key)
            return None if weights is None else self.kernel.run(rows, weights)

        return weighted_sum(x, topk_ids, topk_weights, compute)

    def lookahead(self, layer: int, experts: Sequence[int]) -> None:
        """Queue the experts a draft lacked for the prefetcher, ahead of everything of their
        layer (the `spac` policy; `lru` and `static` prefetch nothing)."""
        if self.prefetcher is None:
            return
        wanted = [(layer, int(expert)) for expert in experts]
        wanted = [key for key in wanted if key not in self.looked_ahead and key not in self.host]
        self.looked_ahead.update(wanted)
        self.prefetcher.add([(key, LOOKAHEAD_UTILITY) for key in wanted])

    def _plan(self, layer: int):
        return self.planner.plan_for(layer, self.counts[layer], self.device.resident(layer),
                                     free_slots=self.device.free())

    def _on_device(self, key) -> bool:
        """Make sure the expert is in a device slot (fetching it from the host tier if the plan
        said so); False when no slot can be had, and the expert then runs on the CPU."""
        if key in self.device.slots:
            self.stats.paging.device_hits += 1
            return True
        return self._copy_to_device(key, self._weights(*key))

    def _prefetch_to_device(self, layer: int, experts: Sequence[int], weights: dict) -> None:
        """The plan's prefetch: experts this layer ran on the CPU, copied (their weights are at
        hand) into free device slots for the next round. It never evicts: a slot in use is worth
        more to this round than a guess is to the next."""
        for expert in experts:
            if not self.device.free():
                return
            self._copy_to_device((layer, expert), weights[expert])

    def _copy_to_device(self, key, weights: dict) -> bool:
        if not self.device.fetch(key, weights, self._utility(key)):
            return False
        self.stats.paging.device_fetches += 1
        self.stats.paging.device_bytes_copied += self.expert_bytes
        return True

    def _weights(self, layer: int, expert: int) -> dict:
        """The expert's weights from the cache, else read from storage now."""
        key = (layer, expert)
        weights = self.host.get(key)
        if weights is None:
            self.stats.paging.host_misses += 1
            started = time.perf_counter()
            weights = self._read_now(layer, expert)
            self.stats.paging.stall_seconds += time.perf_counter() - started
            self._admit(key, weights)
        return weights

    def _read_now(self, layer: int, expert: int):
        """Fetch on a reader thread and wait for it: the caller's wait has a timeout, a read has none."""
        return result(self.readers.submit(self._fetch, layer, expert), self.files.path(layer, expert))

    def _fetch(self, layer: int, expert: int):
        """The expert read from storage and made ready for the kernel (see ExpertKernel.prepare)."""
        return self.kernel.prepare(self._read(layer, expert))

    def _spare(self, weights) -> None:
        """Keep the buffer of a miss computed and dropped (nothing else holds it) for a later read."""
        buffer = read_buffer(weights.values()) if isinstance(weights, dict) else None
        with self.host.lock:
            if buffer is not None and len(self.spare_outside) < self.outside_buffers:
                self.spare_outside.append(buffer)

    def _read(self, layer: int, expert: int) -> dict:
        # Into the buffer of the victim evicted for its room, else one a dropped miss left.
        into = self.host.spare_buffer((layer, expert))
        if into is None:
            with self.host.lock:
                into = self.spare_outside.pop() if self.spare_outside else None
        with self.host.lock:
            started = time.perf_counter()
            self.reads_in_flight += 1
            if self.reads_in_flight == 1:
                self.busy_since = started
        try:
            weights = self.files.read(layer, expert, into)
        finally:
            with self.host.lock:
                ended = time.perf_counter()
                self.reads_in_flight -= 1
                if not self.reads_in_flight:  # the storage goes idle: its busy stretch ends
                    self.stats.paging.busy_seconds += ended - self.busy_since
        with self.host.lock:
            self.stats.paging.storage_reads += 1
            if into is not None and np.may_share_memory(next(iter(weights.values())), np.frombuffer(into, np.uint8)):
                self.stats.paging.reads_into_used_buffers += 1
            self.stats.paging.storage_bytes_read += self.expert_bytes
            self.stats.paging.read_seconds += ended - started
        return weights

    def _utility(self, key) -> float:
        return float(self.estimator.utilities()[key]) if self.estimator is not None else 0.0

    def _admit(self, key, weights, prefetched: bool = False) -> bool:
        return self.host.admit(key, weights, self._utility(key), prefetched)

    # --- rounds ----------------------------------------------------------------------------------

    def end_round(self, proposed: Sequence[int] = (), draft_seconds: float = 0.0, draft_follows: bool = True) -> None:
        """A forward pass of the target finished: update utilities and queue the next round's
        prefetches and plan. `draft_seconds` (how long the last draft took) is the link time the
        balancer may count on behind the next round; `proposed` (the draft tokens that pass
        verified) is not used by this pager. The highest utilities are prefetched only when
        `draft_follows`: the draft's time hides their reads. In plain decoding the next pass starts
        at once and they only compete with its own misses (at a 45 % cap on the memory testbed,
        spac without SD read 11.2 GB with them against 7.0 GB without, at 0.74x the speed)."""
        # Between passes no layer is being computed, so none is frozen while the draft runs, and
        # every prefetch queued before is stale.
        self.position.pass_id += 1
        self.position.layer = -1
        self.position.computed.clear()
        self.looked_ahead.clear()
        self.routing_totals += self.counts
        if self.estimator is not None:
            self.estimator.update(self.counts)
            utilities = self.estimator.utilities()
            self.host.set_utilities(utilities)
            if self.prefetcher is not None:
                self.prefetcher.replace(self._prefetch_targets(utilities) if draft_follows else [])
        if self.planner and self.device:  # the next round's plan is solved while the draft runs
            self.planner.submit(self.counts, [self.device.resident(l) for l in range(len(self.counts))],
                                self.device.free(), window_ms=draft_seconds * 1000.0)
        self.counts[:] = 0

    def _prefetch_targets(self, utilities: np.ndarray) -> list[tuple[tuple[int, int], float]]:
        """The highest-utility experts not cached, as many as the cache holds, best first."""
        wanted = []
        top = np.argsort(-utilities[self.moe_layers], axis=None, kind="stable")[: self.capacity]
        for flat in top:
            row, expert = divmod(int(flat), self.num_experts)
            key = (self.moe_layers[row], expert)
            if utilities[key] <= 0:
                break
            if key not in self.host:
                wanted.append((key, float(utilities[key])))
        return wanted

    def stop_prefetching(self) -> None:
        """Stop the prefetch worker; the pager still serves every expert, on demand."""
        if self.prefetcher is not None:
            self.prefetcher.stop()

    def close(self) -> None:
        self.stop_prefetching()
        self.readers.close()
        if self.planner is not None:
            self.planner.close()
