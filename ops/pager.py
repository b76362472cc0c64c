"""Expert paging between tiers under byte budgets, and the asynchronous execution engine.

Tiers: storage (the package's per-expert .data files, read with pread) -> host (a RAM cache of
expert weights with a byte budget). Every movement of expert weights happens here.

A routed expert that is not cached is never a wrong result: it is computed on the CPU from
weights read for the occasion (`lru` admits them into the cache, evicting the least recently
used; `static` and `spac` admit them only when they outrank the cache's weakest slot).

Policies:
  lru     on-demand fetch, LRU eviction, no prefetch (the MixtralOffload analogue)
  static  a fixed resident set chosen by offline frequency; misses computed from storage
          (the llama.cpp `-ot` / Fiddler analogue)
  spac    utilities from a Speculative Utility Estimator after every verify round; a background
          worker prefetches the highest-utility experts into slots of lower utility while the
          draft runs. Prefetch and eviction share one utility scale: the slots of the layer
          being computed are frozen, a layer just computed becomes evict-first, and a queued
          prefetch whose layer has already started in the current pass is dropped.

Python threads suffice for overlap: os.pread, numpy and ONNX Runtime release the GIL.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .expert_graph import ExpertTensor, weights_from_buffer
from .experts import ExpertKernel, ExpertStats, group_by_expert

POLICIES = ("lru", "static", "spac")
READ_THREADS = 4  # parallel storage reads of one layer's misses (NVMe wants several in flight)


@dataclass
class PagingStats:
    host_hits: int = 0
    host_misses: int = 0
    storage_reads: int = 0
    storage_bytes_read: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_dropped: int = 0
    stall_seconds: float = 0.0
    device_hits: int = 0
    device_fetches: int = 0
    device_bytes_copied: int = 0

    def as_dict(self) -> dict:
        lookups = self.host_hits + self.host_misses
        return {
            "tiers": {"device": {"hits": self.device_hits, "fetches": self.device_fetches,
                                 "bytes_copied": self.device_bytes_copied},
                      "host": {"hits": self.host_hits, "misses": self.host_misses},
                      "storage": {"reads": self.storage_reads, "bytes_read": self.storage_bytes_read}},
            "expert_hit_rate": self.host_hits / lookups if lookups else 1.0,
            "bytes_paged": self.storage_bytes_read,
            "prefetch": {"issued": self.prefetch_issued, "used": self.prefetch_used,
                         "dropped": self.prefetch_dropped},
            "stall_seconds": self.stall_seconds,
        }


class ExpertFiles:
    """The storage tier: whole-file preads of expert .data files. After each read the file's
    pages are dropped from the OS page cache (posix_fadvise DONTNEED), so a later read really
    goes to the disk and the page cache cannot silently act as an unbudgeted RAM tier."""

    def __init__(self, manifest, verify=None):
        self.root = manifest.root
        self.experts = manifest.target.experts
        self.tensors = [ExpertTensor(t["name"], tuple(t["shape"]), t["offset"], t["nbytes"])
                        for t in self.experts.tensors]
        self.dtype = manifest.dtype
        self.verify = verify  # verify(name, data): checks a file's sha256 the first time it is read
        self.verified: set[str] = set()

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        name = self.experts.path(layer, expert, ".data")
        fd = os.open(self.root / name, os.O_RDONLY)
        try:
            data = os.pread(fd, self.experts.bytes_per_expert, 0)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if self.verify and name not in self.verified:
            self.verify(name, data)
            self.verified.add(name)
        return weights_from_buffer(data, self.tensors, self.dtype)


@dataclass
class Slot:
    weights: dict
    utility: float
    prefetched: bool = False  # counts as a used prefetch on its first hit


@dataclass(order=True)
class PrefetchRequest:
    # (layer, -utility): the next pass needs its first layer first, so the queue serves layers
    # in order and, within a layer, the highest utility first.
    order: tuple
    utility: float = field(compare=False)
    pass_id: int = field(compare=False)
    layer: int = field(compare=False)
    expert: int = field(compare=False)


class DeviceSlots:
    """The device tier: a fixed number of expert slots in the memory of the kernel's provider
    (GPU memory on the CUDA EP). A fetch copies host weights in, evicting the lowest-utility
    slot outside the layer being computed, the least recently used among equals (so without
    utilities, as under `lru` and `static`, it is plain LRU)."""

    def __init__(self, kernel: ExpertKernel, capacity: int):
        self.kernel, self.capacity = kernel, capacity
        self.slots: OrderedDict[tuple[int, int], tuple[dict, float]] = OrderedDict()  # LRU first

    def resident(self, layer: int) -> set[int]:
        return {expert for (slot_layer, expert) in self.slots if slot_layer == layer}

    def free(self) -> int:
        return self.capacity - len(self.slots)

    def fetch(self, key, weights: dict, utility: float) -> bool:
        if key in self.slots:
            return True
        if not self.free():
            evictable = [(slot_utility, age, slot_key) for age, (slot_key, (_, slot_utility))
                         in enumerate(self.slots.items()) if slot_key[0] != key[0]]
            if not evictable:
                return False
            del self.slots[min(evictable)[2]]
        self.slots[key] = (self.kernel.to_device(weights), utility)
        return True

    def run(self, key, x: np.ndarray) -> np.ndarray:
        self.slots.move_to_end(key)
        return self.kernel.run(x, self.slots[key][0])


STOP = PrefetchRequest((float("-inf"),), 0.0, -1, -1, -1)  # served before any real request


class PagedExperts:
    """Routed-expert execution from a budgeted host cache; same `run` interface as
    spac.ops.experts.ResidentExperts."""

    def __init__(self, manifest, sessions, budget_bytes: int, policy: str = "spac", estimator=None,
                 frequencies: np.ndarray | None = None, verify=None, device: DeviceSlots | None = None,
                 planner=None):
        """`device` is the GPU tier and `planner` the workload balancer (plan_for(layer, counts,
        resident, free_slots) -> LayerPlan); without them every expert runs on the CPU."""
        if policy not in POLICIES:
            raise ValueError(f"unknown paging policy {policy!r}; valid: {', '.join(POLICIES)}")
        if policy == "spac" and estimator is None:
            raise ValueError("the spac policy needs a utility estimator")
        self.policy, self.estimator = policy, estimator
        self.moe_layers = manifest.target.moe_layers
        self.num_experts = manifest.target.dims["num_experts"]
        self.expert_bytes = manifest.target.experts.bytes_per_expert
        self.capacity = max(0, budget_bytes // self.expert_bytes)  # slots
        self.files = ExpertFiles(manifest, verify)
        self.kernel = ExpertKernel(manifest, sessions)
        self.stats, self.paging = ExpertStats(), PagingStats()
        self.cache: OrderedDict[tuple[int, int], Slot] = OrderedDict()  # LRU order for `lru`
        self.lock = threading.Lock()
        self.counts = np.zeros((max(self.moe_layers) + 1, self.num_experts), dtype=np.int64)
        self.routing_totals = np.zeros_like(self.counts)
        self.pass_id, self.current_layer, self.computed = 0, -1, set()
        self.worker_error: BaseException | None = None
        self.requests: queue.PriorityQueue = queue.PriorityQueue()
        self.in_flight: dict[tuple[int, int], threading.Event] = {}
        self.closed = False
        if policy == "static":
            self._fill_static(frequencies)
        self.device, self.planner = device, planner
        self.readers = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="spac-read")
        self.worker = None
        if policy == "spac" and self.capacity:
            self._start_worker()

    def _start_worker(self) -> None:
        self.worker = threading.Thread(target=self._prefetch_loop, name="spac-prefetch", daemon=True)
        self.worker.start()

    def reset_stats(self) -> None:
        self.stats, self.paging = ExpertStats(), PagingStats()

    # --- the critical path -------------------------------------------------------------------

    def run(self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        self._raise_worker_error()
        self._begin_layer(layer)
        groups = group_by_expert(topk_ids)
        for expert, (rows, _) in groups.items():
            self.counts[layer, expert] += len(rows)
        on_device = self._plan(layer).gpu if self.planner and self.device else frozenset()
        # The whole layer's routing is known before any expert runs (with SD, γ+1 tokens' worth),
        # so every miss is read at once, in parallel, while the cached experts compute.
        gpu = {expert for expert in groups if expert in on_device and self._on_device((layer, expert))}
        weights, reads = {}, {}
        for expert in sorted(groups.keys() - gpu):
            weights[expert] = self._cached((layer, expert))
            if weights[expert] is None:
                self.paging.host_misses += 1
                reads[expert] = self.readers.submit(self._read, layer, expert)
        outputs = {}
        for expert, (rows, _) in groups.items():
            if expert in gpu:
                outputs[expert] = (self.device.run((layer, expert), x[rows]), self.device.kernel.provider)
            elif expert not in reads:
                outputs[expert] = (self.kernel.run(x[rows], weights[expert]), "cpu")
        for expert, read in reads.items():
            started = time.perf_counter()
            weights[expert] = read.result()
            self.paging.stall_seconds += time.perf_counter() - started
            self._admit((layer, expert), weights[expert])
            outputs[expert] = (self.kernel.run(x[groups[expert][0]], weights[expert]), "cpu")
        out = np.zeros_like(x)
        for expert, (rows, slots) in groups.items():  # ascending expert order, as transformers sums
            y, provider = outputs[expert]
            out[rows] += y * topk_weights[rows, slots, None]
            self.stats.calls[provider] += 1
            self.stats.tokens[provider] += len(rows)
        self.computed.add(layer)  # evict-first from now until the next round's utilities
        if layer == self.moe_layers[-1]:
            self._end_pass()
        return out

    def _plan(self, layer: int):
        return self.planner.plan_for(layer, self.counts[layer], self.device.resident(layer),
                                     free_slots=self.device.free())

    def _on_device(self, key) -> bool:
        """Make sure the expert is in a device slot (fetching it from the host tier if the plan
        said so); False when no slot can be had, and the expert then runs on the CPU."""
        if key in self.device.slots:
            self.paging.device_hits += 1
            return True
        if not self.device.fetch(key, self._weights(*key), self._utility(key)):
            return False
        self.paging.device_fetches += 1
        self.paging.device_bytes_copied += self.expert_bytes
        return True

    def _begin_layer(self, layer: int) -> None:
        if layer == self.moe_layers[0]:
            self.pass_id += 1
            self.computed.clear()
        self.current_layer = layer

    def _cached(self, key) -> dict | None:
        """The expert's weights from the host cache (waiting for the prefetch worker if it is
        reading them right now), or None on a miss."""
        with self.lock:
            slot = self.cache.get(key)
            event = self.in_flight.get(key) if slot is None else None
        if slot is None and event is not None:
            started = time.perf_counter()
            event.wait()
            self.paging.stall_seconds += time.perf_counter() - started
            with self.lock:
                slot = self.cache.get(key)
        if slot is None:
            return None
        with self.lock:
            self.paging.host_hits += 1
            if slot.prefetched:
                self.paging.prefetch_used += 1
                slot.prefetched = False
            self.cache.move_to_end(key)
        return slot.weights

    def _weights(self, layer: int, expert: int) -> dict:
        """The expert's weights from the cache, else read from storage now."""
        key = (layer, expert)
        weights = self._cached(key)
        if weights is None:
            self.paging.host_misses += 1
            started = time.perf_counter()
            weights = self._read(layer, expert)
            self.paging.stall_seconds += time.perf_counter() - started
            self._admit(key, weights)
        return weights

    def _read(self, layer: int, expert: int) -> dict:
        weights = self.files.read(layer, expert)
        with self.lock:
            self.paging.storage_reads += 1
            self.paging.storage_bytes_read += self.expert_bytes
        return weights

    # --- cache policy ----------------------------------------------------------------------------

    def _utility(self, key) -> float:
        return float(self.estimator.utilities()[key]) if self.estimator is not None else 0.0

    def _victim(self, utility: float, frozen_layer: int):
        """The slot to give up for an expert of `utility`, or None. lru: the least recently used.
        Otherwise the lowest utility below `utility`, layers computed this pass first, never a
        slot of the layer being computed."""
        if self.policy == "lru":
            return next(iter(self.cache), None)
        candidates = [(key[0] not in self.computed, slot.utility, key) for key, slot in self.cache.items()
                      if key[0] != frozen_layer and slot.utility < utility]
        return min(candidates)[2] if candidates else None

    def _admit(self, key, weights, prefetched: bool = False) -> bool:
        """Put weights in the cache if the policy lets them in; False when they were not kept."""
        if self.policy == "static" or self.capacity == 0:
            return False
        utility = self._utility(key)
        with self.lock:
            if key in self.cache:
                return True
            if len(self.cache) >= self.capacity:
                victim = self._victim(utility if self.policy == "spac" else np.inf, self.current_layer)
                if victim is None:
                    return False
                del self.cache[victim]
            self.cache[key] = Slot(weights, utility, prefetched)
        return True

    def _fill_static(self, frequencies) -> None:
        """The resident set: the most frequently routed experts (offline counts), read once."""
        shape = (len(self.moe_layers), self.num_experts)
        freq = np.zeros(shape) if frequencies is None else np.asarray(frequencies, dtype=np.float64)[self.moe_layers]
        order = np.argsort(-freq, axis=None, kind="stable")[: self.capacity]
        for flat in order:
            row, expert = divmod(int(flat), self.num_experts)
            key = (self.moe_layers[row], expert)
            self.cache[key] = Slot(self._read(*key), float(freq.reshape(-1)[flat]))
        self.paging.storage_reads = self.paging.storage_bytes_read = 0  # loading is not paging

    # --- rounds and the prefetch worker ----------------------------------------------------

    def _end_pass(self) -> None:
        """A verify pass finished: update utilities and queue the next round's prefetches."""
        # Past the pass's last layer: no layer is being computed, so none is frozen while the
        # draft runs, and every prefetch queued for this pass is stale.
        self.current_layer = self.moe_layers[-1] + 1
        self.routing_totals += self.counts
        if self.estimator is not None:
            self.estimator.update(self.counts)
            utilities = self.estimator.utilities()
            with self.lock:
                for key, slot in self.cache.items():
                    slot.utility = float(utilities[key])
            if self.worker is not None:
                self._queue_prefetches(utilities)
        if self.planner and self.device:  # the next round's plan is solved while the draft runs
            self.planner.submit(self.counts, [self.device.resident(l) for l in range(len(self.counts))],
                                self.device.free())
        self.counts[:] = 0

    def _queue_prefetches(self, utilities: np.ndarray) -> None:
        while not self.requests.empty():  # last round's leftovers are stale
            try:
                self.requests.get_nowait()
                with self.lock:
                    self.paging.prefetch_dropped += 1
            except queue.Empty:
                break
        top = np.argsort(-utilities[self.moe_layers], axis=None, kind="stable")[: self.capacity]
        for flat in top:
            row, expert = divmod(int(flat), self.num_experts)
            key = (self.moe_layers[row], expert)
            if utilities[key] <= 0:
                break
            with self.lock:
                if key in self.cache:
                    continue
            utility = float(utilities[key])
            self.requests.put(PrefetchRequest((key[0], -utility), utility, self.pass_id + 1, *key))
            self.paging.prefetch_issued += 1

    def _stale(self, request: PrefetchRequest) -> bool:
        return (self.pass_id, self.current_layer) >= (request.pass_id, request.layer)

    def _prefetch_loop(self) -> None:
        try:
            while True:
                request = self.requests.get()
                if request is STOP or self.closed:
                    return
                key = (request.layer, request.expert)
                if self._stale(request):
                    with self.lock:  # the main thread counts too: keep += whole
                        self.paging.prefetch_dropped += 1
                    continue
                with self.lock:
                    if key in self.cache or key in self.in_flight:
                        continue
                    if len(self.cache) >= self.capacity and self._victim(request.utility, self.current_layer) is None:
                        continue  # nothing cached is worth less than this expert
                    self.in_flight[key] = threading.Event()
                try:
                    weights = self._read(*key)
                    if not self._admit(key, weights, prefetched=True):
                        with self.lock:
                            self.paging.prefetch_dropped += 1
                finally:
                    with self.lock:
                        self.in_flight.pop(key).set()
        except BaseException as error:  # surfaced to the caller at its next layer
            self.worker_error = error

    def _raise_worker_error(self) -> None:
        if self.worker_error is not None:
            error, self.worker_error = self.worker_error, None
            self._start_worker()  # the caller hears of the failure once; later rounds prefetch again
            raise RuntimeError(f"the expert prefetch worker failed: {error}") from error

    def stop_prefetching(self) -> None:
        """Stop the prefetch worker; the pager still serves every expert, on demand."""
        self.closed = True
        if self.worker is not None:
            self.requests.put(STOP)
            self.worker.join(timeout=5)

    def close(self) -> None:
        self.stop_prefetching()
        self.readers.shutdown(wait=True)
        if self.planner is not None:
            self.planner.close()
