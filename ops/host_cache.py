"""The host tier: a RAM cache of expert weights with a fixed number of slots, and the policies
that decide what it keeps.

Policies:
  lru     on-demand fetch, LRU eviction, no prefetch (the MixtralOffload analogue)
  static  a fixed resident set chosen by offline frequency; misses computed from storage
          (the llama.cpp `-ot` / Fiddler analogue)
  spac    utilities from a Speculative Utility Estimator after every verify round; slots of
          lower utility give way to experts of higher utility (the prefetcher brings them while
          the draft runs). The slots of the layer being computed are frozen and a layer just
          computed becomes evict-first.

A miss that `lru` or `spac` will keep gets its slot before it is read (`make_room`): the victim
goes first, so the read's bytes take the victim's memory rather than a buffer of their own, and
the memory limit counts fewer read buffers (spac.ops.pager.PagedExperts.read_buffers). The
prefetcher's reads take theirs the same way (`reserve`). Where the victim's weights view a read's
buffer (spac.ops.direct_io), the read of the expert taking its room lands in that very buffer
(`spare_buffer`): its pages are already faulted in, which a fresh buffer's are not.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .direct_io import read_buffer
from .read_pool import READ_TIMEOUT_S, wait
from .stats import PagingStats

POLICIES = ("lru", "static", "spac")


@dataclass
class Slot:
    weights: dict
    utility: float
    prefetched: bool = False  # counts as a used prefetch on its first hit
    peeked_pass: int = -1  # the last pass whose draft looked at these weights (HostCache.peek)


@dataclass
class PassPosition:
    """Where the target's current forward pass is; shared by the cache and the prefetcher."""

    pass_id: int = 0
    layer: int = -1  # the layer being computed; -1 between passes (none is frozen then)
    computed: set[int] = field(default_factory=set)  # layers done in this pass: evict-first


class HostCache:
    def __init__(self, policy: str, capacity: int, position: PassPosition, paging: PagingStats):
        if policy not in POLICIES:
            raise ValueError(f"unknown paging policy {policy!r}; valid: {', '.join(POLICIES)}")
        self.policy, self.capacity, self.position, self.paging = policy, capacity, position, paging
        self.slots: OrderedDict[tuple[int, int], Slot] = OrderedDict()  # LRU order for `lru`
        self.lock = threading.Lock()
        self.in_flight: dict[tuple[int, int], threading.Event] = {}  # being read by the prefetcher
        self.rooms: set[tuple[int, int]] = set()  # slots given to reads under way; counted in the capacity
        self.victims: dict[tuple[int, int], Slot] = {}  # room -> the slot evicted for it, until its read starts

    def __contains__(self, key) -> bool:
        with self.lock:
            return key in self.slots

    def layer_experts(self, layer: int) -> set[int]:
        with self.lock:
            return {expert for (slot_layer, expert) in self.slots if slot_layer == layer}

    def peek(self, key) -> dict | None:
        """The expert's weights if cached, else None: no waiting, no stats, no change of order
        (a draft's look, which must not count as, or reorder for, the target's use)."""
        with self.lock:
            slot = self.slots.get(key)
            if slot is None:
                return None
            slot.peeked_pass = self.position.pass_id
        return slot.weights

    def get(self, key) -> dict | None:
        """The expert's weights (waiting for the prefetcher if it is reading them right now), or
        None on a miss. A prefetch read that hangs counts as a miss after READ_TIMEOUT_S: the
        caller then reads the file itself, and its own wait names the file when it hangs too."""
        with self.lock:
            slot = self.slots.get(key)
            event = self.in_flight.get(key) if slot is None else None
        if slot is None and event is not None:
            started = time.perf_counter()
            wait(event.wait, READ_TIMEOUT_S)
            self.paging.stall_seconds += time.perf_counter() - started
            with self.lock:
                slot = self.slots.get(key)
        if slot is None:
            return None
        with self.lock:
            self.paging.host_hits += 1
            if slot.prefetched:
                self.paging.prefetch_used += 1
                slot.prefetched = False
            self.slots.move_to_end(key)
        return slot.weights

    def victim(self, utility: float, frozen_layer: int):
        """The slot to give up for an expert of `utility`, or None; never a slot of the layer
        being computed (its weights may still be in use). lru: the least recently used.
        Otherwise the lowest utility below `utility`, layers computed this pass first."""
        if self.policy == "lru":
            return next((key for key in self.slots if key[0] != frozen_layer), None)
        computed = self.position.computed
        candidates = [(key[0] not in computed, slot.utility, key) for key, slot in self.slots.items()
                      if key[0] != frozen_layer and slot.utility < utility]
        return min(candidates)[2] if candidates else None

    def admit(self, key, weights, utility: float, prefetched: bool = False) -> bool:
        """Put weights in the cache (into the room make_room gave them, or in place of a victim)
        if the policy lets them in; False when they were not kept."""
        if self.policy == "static" or self.capacity == 0:
            return False
        with self.lock:
            self.victims.pop(key, None)
            if key in self.slots:
                self.rooms.discard(key)
                return True
            if key not in self.rooms and not self._free_slot(utility):
                return False
            self.rooms.discard(key)
            self.slots[key] = Slot(weights, utility, prefetched)
        return True

    def make_room(self, key, utility: float) -> bool:
        """Give `key` a slot before it is read, evicting the victim now; False (nothing done)
        when the policy would not keep it, or it is cached or has its room already. The caller
        then admits it, or gives the room up (give_up_room) if the read fails."""
        with self.lock:
            return self._give_room(key, utility)

    def _give_room(self, key, utility: float) -> bool:
        """make_room under the lock."""
        if (self.policy == "static" or self.capacity == 0 or key in self.slots or key in self.rooms
                or not self._free_slot(utility, room=key)):
            return False
        self.rooms.add(key)
        return True

    def _free_slot(self, utility: float, room=None) -> bool:
        """Free a slot for an expert of `utility` if none is free (under the lock); the victim of
        a `room` is kept for its read (spare_buffer)."""
        if len(self.slots) + len(self.rooms) < self.capacity:
            return True
        victim = self.victim(utility if self.policy == "spac" else np.inf, self.position.layer)
        if victim is None:
            return False
        slot = self.slots.pop(victim)
        if room is not None:
            self.victims[room] = slot
        return True

    def spare_buffer(self, key):
        """The buffer of the slot evicted to make `key`'s room, for `key`'s read to land in, or
        None (no victim, or one whose weights are not a writable read buffer, or still in use).

        Nothing computes from a victim's weights but what got them from this cache: the target
        computes the layer being computed alone, whose slots are frozen (`victim`), and a draft
        computes from what it looked at (`peek`) during its own pass. A slot looked at during the
        current pass (draft and verify share its id) is therefore never reused; its weights go
        with their last holder, as every victim's did before."""
        with self.lock:
            slot = self.victims.pop(key, None)
        if slot is None or slot.peeked_pass == self.position.pass_id or not isinstance(slot.weights, dict):
            return None
        return read_buffer(slot.weights.values())

    def give_up_room(self, key) -> None:
        with self.lock:
            self.rooms.discard(key)
            self.victims.pop(key, None)

    def reserve(self, key, utility: float) -> bool:
        """Mark `key` as being read for the cache, its room made (make_room), unless it is there,
        on its way, or outranks no slot; True when the caller should read it (and then `release` it)."""
        with self.lock:
            if key in self.in_flight or not self._give_room(key, utility):
                return False  # on its way, cached, or nothing cached is worth less than this expert
            self.in_flight[key] = threading.Event()
        return True

    def release(self, key) -> None:
        """The prefetcher's read of `key` is over (admitted, or failed: its room is given up)."""
        with self.lock:
            self.rooms.discard(key)
            self.victims.pop(key, None)
            self.in_flight.pop(key).set()

    def set_utilities(self, utilities: np.ndarray) -> None:
        with self.lock:
            for key, slot in self.slots.items():
                slot.utility = float(utilities[key])

    def fill_static(self, read, frequencies, moe_layers: list[int], num_experts: int) -> None:
        """The resident set: the most frequently routed experts (offline counts), read once with
        `read(layer, expert)` (loading is not paging: it is not counted)."""
        shape = (len(moe_layers), num_experts)
        freq = np.zeros(shape) if frequencies is None else np.asarray(frequencies, dtype=np.float64)[moe_layers]
        order = np.argsort(-freq, axis=None, kind="stable")[: self.capacity]
        for flat in order:
            row, expert = divmod(int(flat), num_experts)
            key = (moe_layers[row], expert)
            self.slots[key] = Slot(read(*key), float(freq.reshape(-1)[flat]))
