#!/usr/bin/env python3
"""What block quantization costs in accuracy: int8 and int4 packages against the float32 export.

    python scripts/quantization_accuracy.py                       # every family, random weights
    python scripts/quantization_accuracy.py --trained cache/trained --families   # trained model only
    python scripts/quantization_accuracy.py ... --block-size 128 --symmetric    # another block layout

Per family (tiny random-weight models from make_models.py, experts quantized, trunk float):
max abs logit difference against the float32 package and greedy agreement, both over 64 tokens:
the float32 package's greedy continuation of a 16-token prompt is fed to both packages, and at
each of the 64 positions the logits are compared and the two argmaxes must agree (teacher
forcing, so one early disagreement does not make every later position differ).

With --trained, the model that scripts/train_small_moe.py trained is exported float32, int8 and
int4 (experts and trunk, block 32 unless --block-size) and each package's perplexity is
measured on the training script's own held-out windows. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spac.ops.experts import ResidentExperts  # noqa: E402
from spac.ops.quantization import CLI_BLOCK_SIZES, DEFAULT_BLOCK_SIZE  # noqa: E402
from spac.ops.sessions import SessionFactory  # noqa: E402
from spac.runtime.manifest import load_manifest  # noqa: E402
from spac.runtime.model import ModelRunner  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 16, 64
KINDS = ("int8", "int4")


def target_runner(package) -> ModelRunner:
    manifest = load_manifest(package)
    sessions = SessionFactory()
    return ModelRunner(manifest, manifest.target, sessions, ResidentExperts(manifest, sessions))


def greedy_continuation(runner: ModelRunner, prompt: list[int], new_tokens: int) -> list[int]:
    runner.reset()
    tokens, logits = [], runner.forward(prompt)
    for _ in range(new_tokens):
        tokens.append(int(logits[-1].argmax()))
        logits = runner.forward(tokens[-1:])
    return tokens


def compare(reference: ModelRunner, candidate: ModelRunner, prompt: list[int], new_tokens: int = NEW_TOKENS) -> dict:
    """Max abs logit difference and greedy agreement over the reference's greedy continuation."""
    sequence = prompt + greedy_continuation(reference, prompt, new_tokens)
    positions = slice(len(prompt) - 1, len(sequence) - 1)  # the positions predicting new tokens
    logits = []
    for runner in (reference, candidate):
        runner.reset()
        logits.append(runner.forward(sequence)[positions].astype(np.float32))
    ours, theirs = logits[1], logits[0]
    return {"max_abs_logit_diff": float(np.abs(ours - theirs).max()),
            "max_abs_logit": float(np.abs(theirs).max()),
            "greedy_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}


def perplexity(runner: ModelRunner, windows: np.ndarray) -> float:
    """exp(mean next-token cross-entropy) over every predicted position of the windows."""
    total, count = 0.0, 0
    for window in windows:
        runner.reset()
        logits = runner.forward(window.tolist())[:-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return math.exp(total / count)


def export(model_dir: Path, draft_dir: Path, output: Path, **options) -> Path:
    from spac.export.package import ExportOptions, export_package
    from spac.export.verify import verify_package

    export_package(ExportOptions(model_dir, draft_dir, output, progress=False, **options), verify_fn=verify_package)
    return output


def family_rows(families: list[str], work: Path, layout: dict) -> list[dict]:
    from make_models import make_pair

    rows = []
    for family in families:
        model_dir, draft_dir = make_pair(family, work / "models")
        reference = target_runner(export(model_dir, draft_dir, work / f"{family}-float32"))
        prompt = np.random.default_rng(0).integers(0, reference.section.dims["vocab_size"], PROMPT_TOKENS).tolist()
        for kind in KINDS:
            package = export(model_dir, draft_dir, work / f"{family}-{kind}", experts=kind, **layout)
            row = {"family": family, "experts": kind, **compare(reference, target_runner(package), prompt)}
            rows.append(row)
            print(f"{family:16s} {kind}  max abs logit diff {row['max_abs_logit_diff']:.2e} "
                  f"(of {row['max_abs_logit']:.2f})  greedy agreement {row['greedy_agreement']:.3f}", flush=True)
    return rows


def heldout_windows(trained: Path) -> np.ndarray:
    """The held-out windows train_small_moe.py evaluates on, with the trained tokenizer."""
    import train_small_moe as training
    from tokenizers import Tokenizer

    report = json.loads((trained / training.REPORT).read_text())
    tokenizer = Tokenizer.from_file(str(trained / training.MOE_DIR / "tokenizer.json"))
    eos = json.loads((trained / training.MOE_DIR / "config.json").read_text())["eos_token_id"]
    _, heldout = training.stdlib_files()
    stream = training.token_stream(tokenizer, heldout, eos)
    recipe = report["recipe"]
    return training.eval_windows(stream, recipe["eval_windows"], recipe["seq_len"]).numpy()


def trained_rows(trained: Path, work: Path, layout: dict) -> list[dict]:
    import train_small_moe as training

    model_dir, draft_dir = trained / training.MOE_DIR, trained / training.DRAFT_DIR
    windows = heldout_windows(trained)
    rows, baseline = [], None
    for kind in ("float", *KINDS):
        package = export(model_dir, draft_dir, work / f"trained-{kind}", experts=kind, trunk=kind,
                         **layout)
        value = perplexity(target_runner(package), windows)
        baseline = baseline or value
        rows.append({"experts_and_trunk": kind, "heldout_perplexity": value, "vs_float32": value / baseline - 1})
        print(f"trained model, {kind:5s}: held-out perplexity {value:.4f} ({rows[-1]['vs_float32']:+.2%})", flush=True)
    return rows


def main(argv=None) -> dict:
    from make_models import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), help="families to measure (default: all)")
    parser.add_argument("--trained", type=Path, help="folder of train_small_moe.py's models and train_report.json")
    parser.add_argument("--block-size", type=int, choices=CLI_BLOCK_SIZES, default=DEFAULT_BLOCK_SIZE,
                        help=f"quantization block size (default: {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--symmetric", action="store_true", help="symmetric blocks, no zero points (default: asymmetric)")
    parser.add_argument("--out", type=Path, default=Path("quantization_accuracy.json"))
    args = parser.parse_args(argv)
    layout = {"block_size": args.block_size, "symmetric": args.symmetric}
    from spac.export.cli import quiet_exporter_logs

    quiet_exporter_logs()
    with tempfile.TemporaryDirectory(prefix="spac-quant-accuracy-") as work:
        result = {**layout, "families": family_rows(args.families, Path(work), layout)}
        if args.trained:
            result["trained"] = trained_rows(args.trained, Path(work), layout)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
