#!/usr/bin/env python3
"""Build the memory testbed: the trained small MoE with every expert widened (zero
down-projection neurons) to realistic bytes and FLOPs, plus its draft, unchanged.

    python scripts/make_testbed.py --trained cache/trained --out cache/testbed --width 8192

`--trained` is train_small_moe.py's output folder (small-moe/ and small-draft/). The testbed's
tokens, routing and draft acceptance are the trained model's (see spac.export.testbed); only the
bytes an expert occupies and the arithmetic it costs grow. With the default recipe (hidden 192,
4 layers x 16 experts) and width 8192 an fp32 expert is 18.9 MB and the experts 1.21 GB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from spac.export.testbed import WideningError, widen_experts

MOE_DIR, DRAFT_DIR = "small-moe", "small-draft"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trained", type=Path, required=True, help=f"folder holding {MOE_DIR}/ and {DRAFT_DIR}/")
    p.add_argument("--out", type=Path, required=True, help=f"folder that receives {MOE_DIR}/ and {DRAFT_DIR}/")
    p.add_argument("--width", type=int, default=8192, help="each expert's new intermediate size")
    p.add_argument("--seed", type=int, default=0, help="seeds the new neurons' gate and up weights")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in (MOE_DIR, DRAFT_DIR):
        if not (args.trained / name / "config.json").is_file():
            print(f"error: {args.trained / name} is not a model folder (no config.json); run "
                  "scripts/train_small_moe.py first", file=sys.stderr)
            return 2
        if (args.out / name).exists():
            print(f"error: {args.out / name} exists; remove it or choose another --out", file=sys.stderr)
            return 2
    try:
        wide = widen_experts(args.trained / MOE_DIR, args.out / MOE_DIR, args.width, args.seed)
    except WideningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shutil.copytree(args.trained / DRAFT_DIR, args.out / DRAFT_DIR)
    print(f"testbed in {args.out}: {wide.experts} experts of {wide.expert_bytes / 1e6:.1f} MB, "
          f"{wide.experts * wide.expert_bytes / 1e9:.2f} GB of experts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
