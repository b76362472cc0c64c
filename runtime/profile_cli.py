"""``spac-profile``: list, show and calibrate device profiles.

    spac-profile list
    spac-profile show rtx4090-desktop --expert-bytes 9437184 --total-expert-bytes 58GB
    spac-profile calibrate --package PKG --out my-device.yaml [--base cpu-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from spac.runtime.arguments import Parser
from spac.runtime.manifest import ManifestError, load_manifest
from spac.runtime.profile import (ALIASES, ExpertCost, Profile, ProfileError,
                                  available_profiles, format_bytes, load_profile, parse_bytes,
                                  save_profile)

# A timer for one provider: seconds one expert call takes with ``tokens`` tokens.
ExpertTimer = Callable[[int], float]

CALIBRATION_TOKENS = (1, 2, 4, 8, 16)
READ_CHUNK = 16 * 2**20


# ---------------------------------------------------------------------------------------------
# Measurements


def measure_read_gbps(directory: str | Path, max_bytes: int = 1 << 30) -> float:
    """Storage → host bandwidth in GB/s from reading the files under ``directory`` (largest
    first, up to ``max_bytes``). Each file is dropped from the page cache first where the OS
    allows (posix_fadvise), so the disk is measured rather than RAM."""
    files = sorted((p for p in Path(directory).rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size, reverse=True)
    if not files:
        raise ProfileError(f"no files to read under {directory}")
    buffer = bytearray(READ_CHUNK)
    total, elapsed = 0, 0.0
    for path in files:
        if total >= max_bytes:
            break
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            began = time.perf_counter()
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                while total < max_bytes and (n := f.readinto(buffer)):
                    total += n
            elapsed += time.perf_counter() - began
        finally:
            os.close(fd)
    return total / elapsed / 1e9


def measure_host_to_device_gbps(nbytes: int = 256 * 2**20, repeats: int = 5) -> float | None:
    """Host → GPU copy bandwidth in GB/s through ONNX Runtime, or None without a usable GPU
    (onnxruntime-gpu lists CUDA even where there is none: the copy is what tells)."""
    try:
        import onnxruntime as ort

        host = np.ones(nbytes // 4, dtype=np.float32)
        ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)  # warm-up: CUDA context, allocator
        began = time.perf_counter()
        for _ in range(repeats):
            ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)
        return nbytes * repeats / (time.perf_counter() - began) / 1e9
    except Exception:  # no onnxruntime-gpu, no device, no driver: all mean "no GPU here"
        return None


def fit_expert_cost(timer: ExpertTimer, expert_bytes: int,
                    tokens: Sequence[int] = CALIBRATION_TOKENS, repeats: int = 20) -> ExpertCost:
    """Fit ``time = intercept + slope·tokens`` to the median of ``repeats`` calls per size.

    One expert size cannot tell call overhead from weight streaming, so the intercept is
    booked as streaming (``ms_per_mb``), which is what dominates at decode batch sizes."""
    medians = [float(np.median([timer(n) for _ in range(repeats)])) * 1000.0 for n in tokens]
    slope, intercept = np.polyfit(np.asarray(tokens, dtype=float), medians, 1)
    mb = expert_bytes / 1e6
    return ExpertCost(a_ms=0.0, ms_per_mb=_significant(max(intercept, 0.0) / mb),
                      b_ms_per_token_per_mb=_significant(max(slope, 0.0) / mb))


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")  # a plain float, readable in the YAML


def package_expert_timers(manifest, threads: int) -> dict[str, ExpertTimer]:
    """Timers of the package's first expert on each provider this machine has: the same kernel
    the pager runs, fed weights read from the package."""
    from spac.ops.experts import ExpertKernel
    from spac.ops.storage import ExpertFiles
    from spac.ops.sessions import SessionFactory, cuda_available

    sessions = SessionFactory(threads)
    weights = ExpertFiles(manifest).read(manifest.target.moe_layers[0], 0)
    hidden = manifest.target.dims["hidden_size"]
    dtype = next(iter(weights.values())).dtype
    timers = {}
    for ep in ["cpu"] + (["cuda"] if cuda_available() else []):
        kernel = ExpertKernel(manifest, sessions, ep)
        on_device = kernel.to_device(weights)

        def timer(tokens: int, kernel=kernel, on_device=on_device) -> float:
            x = np.ones((tokens, hidden), dtype=dtype)
            began = time.perf_counter()
            kernel.run(x, on_device)
            return time.perf_counter() - began

        timer(1)  # warm-up: first-run allocations
        timers[ep] = timer
    return timers


def calibrate(out: str | Path, storage_dir: str | Path, base: Profile,
              expert_timers: Mapping[str, ExpertTimer] | None = None,
              expert_bytes: int | None = None, log=print) -> Profile:
    """Measure this machine and write a profile to ``out`` (atomically).

    ``expert_timers`` maps a provider ("cpu", "cuda") to a timer of one real expert of the
    package; providers without one keep ``base``'s costs, and the file says so. Links that
    cannot be measured here (host → device without a GPU) keep ``base``'s values."""
    expert_timers = expert_timers or {}
    if expert_timers and not expert_bytes:
        raise ValueError("timing experts needs expert_bytes, the timed expert's weight bytes")
    read_gbps = measure_read_gbps(storage_dir)
    log(f"storage → host: {read_gbps:.2f} GB/s")
    h2d = measure_host_to_device_gbps()
    log(f"host → device: {f'{h2d:.2f} GB/s' if h2d else 'n/a (no GPU)'}")
    links = dataclasses.replace(base.links, storage_to_host_gbps=round(read_gbps, 3))
    if h2d:
        links = dataclasses.replace(links, host_to_device_gbps=round(h2d, 3))

    costs = dict(base.expert_costs)
    notes = []
    for ep in costs:
        if ep in expert_timers:
            costs[ep] = fit_expert_cost(expert_timers[ep], expert_bytes)
            log(f"expert on {ep}: {costs[ep]}")
        else:
            notes.append(f"# experts.{ep}: copied from {base.name}, not measured\n")
            log(f"expert on {ep}: not measured, kept from {base.name}")
    name = Path(out).stem
    profile = dataclasses.replace(base, name=name, links=links, expert_costs=costs,
                                  description=f"calibrated by spac-profile from {base.name}")
    header = f"# Written by `spac-profile calibrate` on {time.strftime('%Y-%m-%d')}.\n"
    save_profile(profile, out, header + "".join(notes))
    log(f"wrote {out}")
    return profile


# ---------------------------------------------------------------------------------------------
# Commands


def show(profile: Profile, expert_bytes: int | None, total_expert_bytes: int | None,
         trunk_bytes: int) -> str:
    lines = [f"{profile.name}: {profile.description}" if profile.description else profile.name,
             f"  file: {profile.source}",
             "  providers: " + ", ".join(
                 f"{p.ort_name}{p.options if p.options else ''}" for p in profile.providers),
             f"  memory: {profile.memory}"]
    for tier, budget in profile.budgets.items():
        if tier == "device" and not profile.has_gpu:
            continue
        if budget.unlimited:
            text = "unlimited"
        elif budget.fraction is not None:
            text = f"{budget.fraction:.1%} of expert bytes (+ trunk)"
        else:
            text = f"{format_bytes(budget.nbytes)} ({budget.nbytes} bytes, trunk included)"
        if total_expert_bytes:
            cache = profile.budget_bytes(tier, total_expert_bytes, trunk_bytes)
            text += f" → expert cache {format_bytes(cache)}"
            if cache is not None and expert_bytes:
                text += f" = {cache // expert_bytes} experts"
        lines.append(f"  budget {tier}: {text}")
    links = profile.links
    lines.append(f"  links: storage → host {links.storage_to_host_gbps:g} GB/s, host → device "
                 + (f"{links.host_to_device_gbps:g} GB/s" if links.host_to_device_gbps else "n/a")
                 + (f", DRAM {links.memory_gbps:g} GB/s" if links.memory_gbps else ""))
    mb = (expert_bytes or 0) / 1e6
    for ep, cost in profile.expert_costs.items():
        text = (f"  expert on {ep}: {cost.a_ms:g} ms + {cost.ms_per_mb:g} ms/MB + "
                f"{cost.b_ms_per_token_per_mb:g} ms/token/MB")
        if mb:
            gamma = profile.draft_len + 1
            text += (f" → {cost.time_ms(1, mb):.3f} ms at 1 token, "
                     f"{cost.time_ms(gamma, mb):.3f} ms at {gamma}")
        lines.append(text)
    if mb and profile.has_gpu:
        lines.append(f"  fetching one expert: {profile.transfer_ms(expert_bytes):.3f} ms")
    lines += [f"  threads: {profile.threads}, draft_len (γ): {profile.draft_len} (self-drafting: "
              f"{profile.self_draft_len}), "
              f"policy: {profile.policy}, estimator: {profile.estimator}",
              f"  balancer: {profile.balancer.solver}, {profile.balancer.time_limit_ms:g} ms "
              "per round" + ("" if profile.has_gpu else " (unused: no GPU)")]
    return "\n".join(lines)


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ProfileError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(prog="spac-profile", description="Device profiles.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the shipped profiles")
    p = sub.add_parser("show", help="print a profile with its resolved values")
    p.add_argument("name", help="shipped profile name or a YAML path")
    p.add_argument("--expert-bytes", type=_size, help="one expert's size, for example costs")
    p.add_argument("--total-expert-bytes", type=_size, help="all experts' size, for budgets")
    p.add_argument("--trunk-bytes", type=_size, default=0)
    p = sub.add_parser("calibrate", help="measure this machine and write a profile")
    p.add_argument("--package", required=True, type=Path, help="a SpAc package directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--base", default="cpu-only", help="profile whose other fields to keep")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "list":
            for name in available_profiles():
                aliases = [a for a, target in ALIASES.items() if target == name]
                suffix = f" (alias: {', '.join(aliases)})" if aliases else ""
                print(f"{name}{suffix}: {load_profile(name).description}")
        elif args.command == "show":
            print(show(load_profile(args.name), args.expert_bytes, args.total_expert_bytes,
                       args.trunk_bytes))
        else:
            base = load_profile(args.base)
            manifest = load_manifest(args.package)
            calibrate(args.out, args.package, base, package_expert_timers(manifest, base.threads),
                      manifest.target.experts.bytes_per_expert)
    except (ProfileError, ManifestError) as err:
        print(f"spac-profile: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
