"""The device tier: a fixed number of expert slots in the memory of a kernel's provider."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .experts import ExpertKernel


class DeviceSlots:
    """Expert slots in the memory of the kernel's provider (GPU memory on the CUDA EP). A fetch
    copies host weights in, evicting the lowest-utility slot outside the layer being computed,
    the least recently used among equals (so without utilities, as under `lru` and `static`, it
    is plain LRU)."""

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
