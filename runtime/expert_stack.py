"""The expert stack of a runtime, built in one place from the package, the device profile and
the caller's choices: every expert resident, or the pager (with the device tier and the balancer
when there is one)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

from spac.ops.device_slots import DeviceSlots
from spac.ops.direct_io import DirectReader
from spac.ops.lookahead import Lookahead, load_routers
from spac.ops.experts import ExpertKernel, Experts, ResidentExperts, cached_expert_bytes
from spac.ops.pager import PagedExperts
from spac.ops.sessions import SessionFactory

from .balancer import Balancer
from .estimator import make_estimator
from .manifest import Manifest, verify_file
from .profile import Profile

log = logging.getLogger("spac")


@dataclass(frozen=True)
class ExpertOptions:
    """The caller's choices; None takes the profile's."""

    policy: str | None = None
    host_budget: float | int | None = None  # a fraction of the expert bytes (float) or bytes (int)
    estimator: str | None = None
    static_frequencies: object = None  # [layer, expert] routing counts: the `static` resident set
    provider: str = "cpu"  # where the experts run ("cuda": the device tier, on the GPU)
    # The device tier's EP: "cuda" when provider is; "cpu" runs the same tier (slots, balancer
    # plans) on the CPU EP, to exercise it without a GPU; None: no device tier.
    device_tier: str | None = None
    device_slots: int | None = None  # None: as many as the profile's device budget holds
    direct_io: bool = True  # read expert files with O_DIRECT (spac.ops.direct_io)
    layer_lookahead: bool = False  # read what later layers' routers guess early (spac policy; spac.ops.lookahead)
    plain_decoding: bool = False  # no draft: every pass after the prefill is one token


def verify_trunk(manifest: Manifest) -> None:
    """Check every package file but the experts' and their draft copies' .data files (graphs,
    their weights, the tokenizer) against the manifest, before ONNX Runtime sees any of them."""
    for name in manifest.files:
        if name not in manifest.expert_data and name not in manifest.draft_expert_data:
            verify_file(manifest, name)


def host_budget_bytes(manifest: Manifest, profile: Profile, host_budget: float | int | None) -> int | None:
    """The host cache's budget in expert bytes as stored: `host_budget` (a fraction of the
    expert bytes, or bytes), else the profile's; None: no limit."""
    total = manifest.expert_bytes_total()
    if host_budget is None:
        return profile.budget_bytes("host", total, manifest.trunk_bytes())
    if isinstance(host_budget, float):
        return int(host_budget * total)
    return int(host_budget)


def pages_on_host(manifest: Manifest, budget: int | None) -> bool:
    """Whether a host budget of `budget` bytes (None: no limit) holds fewer than all of the
    experts, so that some are read from storage."""
    return budget is not None and budget < manifest.expert_bytes_total()


def build_experts(manifest: Manifest, profile: Profile, sessions: SessionFactory,
                  options: ExpertOptions = ExpertOptions()) -> Experts:
    """Every expert resident when the host budget holds them all and there is no device tier to
    manage; otherwise the pager, with the device tier and the balancer on a CUDA profile. Checks
    the sha256 of the expert data it loads now (paged expert files are checked as they are first
    read); every other file was checked by verify_trunk before anything loaded."""
    total = manifest.expert_bytes_total()
    budget = host_budget_bytes(manifest, profile, options.host_budget)
    device_tier = options.device_tier or ("cuda" if options.provider == "cuda" else None)
    paged = device_tier is not None or pages_on_host(manifest, budget)
    if not paged:
        return _resident(manifest, sessions, options.provider)
    moe = manifest.target
    layers, experts, expert_bytes = max(moe.moe_layers) + 1, moe.dims["num_experts"], moe.experts.bytes_per_expert
    device = planner = None
    if device_tier is not None:
        slots = options.device_slots
        if slots is None:
            device_budget = profile.budget_bytes("device", total, manifest.trunk_bytes())
            slots = layers * experts if device_budget is None else device_budget // expert_bytes
        device = DeviceSlots(ExpertKernel(manifest, sessions, device_tier), slots)
        planner = Balancer(profile, layers, experts, expert_bytes)
    policy = options.policy or profile.policy
    if policy == "static" and options.static_frequencies is None:
        log.warning("policy static without routing counts keeps the first experts of the first layers; record "
                    "counts on typical text with spac-run --save-routing FILE and give them with --routing FILE")
    return PagedExperts(manifest, sessions, total if budget is None else budget, policy,
                        make_estimator(options.estimator or profile.estimator, layers, experts),
                        options.static_frequencies, verify=lambda name, data: verify_file(manifest, name, data),
                        device=device, planner=planner, reader=DirectReader() if options.direct_io else None,
                        layer_lookahead=(Lookahead(load_routers(manifest), moe.dims["top_k"])
                                         if options.layer_lookahead else None),
                        plain_decoding=options.plain_decoding)


def build_draft_copies(manifest: Manifest, sessions: SessionFactory, provider: str) -> ResidentExperts:
    """The package's draft copies of the experts (target.draft_experts), every one held, for
    spac.ops.self_draft to draft with. A session each, not QMoE layers: on the memory testbed
    (int4 copies of 2.9 MB, hidden 192) they held 1.48x their bytes against 1.80x and ran a
    draft token's 4 layers in 1.06 against 1.14 ms."""
    return _resident(manifest.draft_copies(), sessions, provider, "loading draft copies", fuse=False)


def draft_copies_bytes(manifest: Manifest) -> int:
    """What build_draft_copies will hold: every copy as a prepared session (see
    spac.ops.experts.cached_expert_bytes)."""
    copies = manifest.draft_copies()
    return len(copies.expert_data) * cached_expert_bytes(copies, prepared=True)


def _resident(manifest: Manifest, sessions: SessionFactory, provider: str,
              label: str = "loading experts", fuse: bool = True) -> ResidentExperts:
    """Every expert held, their data checked against the manifest first."""
    for name in sorted(manifest.expert_data):
        verify_file(manifest, name)
    experts = len(manifest.target.moe_layers) * manifest.target.dims["num_experts"]
    # tqdm shows the bar on a terminal only (disable=None): logs and pipes stay clean.
    with tqdm(total=experts, desc=label, unit="expert", disable=None, leave=False) as bar:
        return ResidentExperts(manifest, sessions, provider, progress=bar.update, fuse=fuse)
