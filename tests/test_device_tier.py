"""The device tier and the balancer's plan, exercised on the CPU: the same DeviceSlots and
PagedExperts code that serves CUDA, built by the same factory, with the slots' kernel on the CPU
EP (no GPU here). The CUDA path differs only inside ExpertKernel (OrtValues on the GPU,
IOBinding)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from spac.ops.device_slots import DeviceSlots
from spac.ops.experts import ExpertKernel
from spac.ops.sessions import SessionFactory
from spac.runtime.expert_stack import ExpertOptions, build_experts
from spac.runtime.manifest import load_manifest
from spac.runtime.model import ModelRunner
from spac.runtime.profile import load_profile
from spac.runtime.speculative import Decoder, Sampler


class PlanRecorder:
    """Wraps the real Balancer to record the plans the pager was given."""

    def __init__(self, balancer):
        self.balancer, self.plans = balancer, []

    def plan_for(self, *args, **kwargs):
        self.plans.append(self.balancer.plan_for(*args, **kwargs))
        return self.plans[-1]

    def submit(self, *args, **kwargs):
        self.balancer.submit(*args, **kwargs)

    def close(self):
        self.balancer.close()


@pytest.mark.parametrize("device_slots", [2, 6])
def test_experts_run_where_the_plan_says_and_output_stays_lossless(exported, model_pair, device_slots):
    manifest = load_manifest(exported("mixtral").output)
    sessions = SessionFactory(threads=1)
    moe = manifest.target
    options = ExpertOptions(policy="spac", host_budget=manifest.expert_bytes_total() // 2, estimator="decayed",
                            device_tier="cpu", device_slots=device_slots)
    pager = build_experts(manifest, load_profile("rtx4090-desktop"), sessions, options)
    planner = pager.planner = PlanRecorder(pager.planner)
    device = pager.device
    try:
        target = ModelRunner(manifest, moe, sessions, pager)
        draft = ModelRunner(manifest, manifest.draft, sessions)
        decoder = Decoder(target, draft, Sampler(), pager)
        prompt = [5, 17, 42, 99, 3, 7, 250, 11]
        decoder.prefill(prompt)
        while len(decoder.tokens) < len(prompt) + 24:
            decoder.step(4)
        model = AutoModelForCausalLM.from_pretrained(model_pair("mixtral")[0])
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0].tolist()
        assert decoder.tokens[:len(expected)] == expected
        planned_gpu = sum(len(plan.gpu) for plan in planner.plans)
        assert planned_gpu > 0, "the balancer never put an expert on the GPU"
        paging = pager.stats.paging
        assert paging.device_hits + paging.device_fetches > 0
        assert len(device.slots) <= device_slots
        assert paging.device_bytes_copied == paging.device_fetches * moe.experts.bytes_per_expert
    finally:
        pager.close()


def test_device_slots_never_evict_the_layer_being_computed(exported):
    manifest = load_manifest(exported("mixtral").output)
    device = DeviceSlots(ExpertKernel(manifest, SessionFactory(threads=1), "cpu"), capacity=2)
    weights = {"w": np.zeros(1)}
    assert device.fetch((0, 1), weights, utility=0.1)
    assert device.fetch((0, 2), weights, utility=0.2)
    assert not device.fetch((0, 3), weights, utility=0.9), "both slots belong to layer 0, the one computing"
    assert device.fetch((1, 3), weights, utility=0.0)
    assert set(device.slots) == {(0, 2), (1, 3)}, "the lowest-utility slot of another layer goes"


def test_device_slots_are_lru_among_equal_utilities(exported):
    manifest = load_manifest(exported("mixtral").output)
    device = DeviceSlots(ExpertKernel(manifest, SessionFactory(threads=1), "cpu"), capacity=2)
    weights = zero_expert(manifest)
    device.fetch((0, 1), weights, utility=0.0)
    device.fetch((0, 2), weights, utility=0.0)
    device.run((0, 1), np.zeros((1, manifest.target.dims["hidden_size"]), np.float32))  # (0, 2) is now LRU
    assert device.fetch((1, 3), weights, utility=0.0)
    assert set(device.slots) == {(0, 1), (1, 3)}


def zero_expert(manifest) -> dict:
    return {t["name"]: np.zeros(t["shape"], np.float32) for t in manifest.target.experts.tensors}
