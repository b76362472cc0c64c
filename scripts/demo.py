#!/usr/bin/env python3
"""The main job end to end: build a small MoE model and a draft, export them with spac-export,
then generate with spac-run. Prints each command before running it.

    python scripts/demo.py [--family qwen3_moe] [--work cache/demo] [--prompt "def add(a, b):"]

With the trained small model (scripts/train_small_moe.py) present under cache/trained, that pair
is used instead of random weights, so the text means something.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TRAINED = HERE.parent / "cache" / "trained"


def run(command: list[str]) -> None:
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen3_moe", help="MoE family for the random-weight model")
    parser.add_argument("--work", type=Path, default=Path("cache/demo"), help="folder for models and package")
    parser.add_argument("--prompt", default="def add(a, b):\n    return")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    if (TRAINED / "small-moe" / "config.json").exists():
        model_dir, draft_dir = TRAINED / "small-moe", TRAINED / "small-draft"
        package = args.work / "package-trained"
    else:
        import make_models

        print(f"building a random-weight {args.family} model and a qwen3 draft in {args.work}", flush=True)
        model_dir, draft_dir = make_models.make_pair(args.family, args.work / "models")
        package = args.work / f"package-{args.family}"
    bin_dir = Path(sys.executable).parent
    run([str(bin_dir / "spac-export"), str(model_dir), "--draft", str(draft_dir), "-o", str(package), "--force"])
    run([str(bin_dir / "spac-run"), "--package", str(package), "--profile", "cpu-only", "--prompt", args.prompt,
         "--max-new-tokens", str(args.max_new_tokens)])


if __name__ == "__main__":
    main()
