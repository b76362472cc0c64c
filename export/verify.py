"""The exporter's own check: run the package with the spac runtime's model runner on ONNX Runtime
and compare its logits with the transformers model's, for a prompt and cached decode steps."""

from __future__ import annotations

import numpy as np
import torch

from spac.ops.experts import ResidentExperts
from spac.ops.sessions import SessionFactory
from spac.runtime.manifest import load_manifest
from spac.runtime.model import ModelRunner

TOLERANCE = {"float32": 1e-4, "float16": 5e-2}


def reference_logits(model, prompt: np.ndarray, steps: list[int]) -> list[np.ndarray]:
    """transformers' logits for the prompt, then for each decode token fed one at a time with its cache."""
    with torch.no_grad():
        out = model(torch.from_numpy(prompt)[None], use_cache=True)
        logits, cache = [out.logits[0].float().numpy()], out.cache
        for token in steps:
            out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            logits.append(out.logits[0].float().numpy())
            cache = out.cache
    return logits


def compare(runner: ModelRunner, model, prompt: np.ndarray, decode_steps: int) -> float:
    """Max |logit difference| over the prompt and `decode_steps` greedy steps chosen by the package."""
    runner.reset()
    ours = [runner.forward(prompt).astype(np.float32)]
    steps = []
    for _ in range(decode_steps):
        steps.append(int(ours[-1][-1].argmax()))
        ours.append(runner.forward([steps[-1]]).astype(np.float32))
    theirs = reference_logits(model, prompt, steps)
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


def verify_package(package, model, draft=None, prompt_len: int = 16, decode_steps: int = 8, seed: int = 0) -> dict:
    manifest = load_manifest(package)
    sessions = SessionFactory()
    prompt = np.random.default_rng(seed).integers(0, manifest.target.dims["vocab_size"], prompt_len)
    # One expert session at a time: the transformers model already holds every weight in memory.
    experts = ResidentExperts(manifest, sessions, preload=False)
    target = ModelRunner(manifest, manifest.target, sessions, experts)
    tolerance = TOLERANCE[manifest.dtype]
    report = {"target_max_abs_diff": compare(target, model, prompt, decode_steps), "draft_max_abs_diff": None,
              "tolerance": tolerance, "prompt_tokens": prompt_len, "decode_steps": decode_steps}
    if draft is not None:  # a package without a draft model has no draft graphs to check
        draft_runner = ModelRunner(manifest, manifest.draft, sessions)
        report["draft_max_abs_diff"] = compare(draft_runner, draft, prompt, decode_steps)
    report["passed"] = max(report["target_max_abs_diff"], report["draft_max_abs_diff"] or 0.0) <= tolerance
    return report
