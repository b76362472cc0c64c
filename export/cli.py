"""spac-export: a Hugging Face MoE model (and optionally a draft) -> a spac package of ONNX graphs."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

from spac.ops.quantization import CLI_BLOCK_SIZES, DEFAULT_BLOCK_SIZE
from spac.runtime.arguments import Parser
from spac.runtime.logs import add_logging_flags, setup_logging

DESCRIPTION = """\
Split a Hugging Face Mixture-of-Experts model (and its draft, if given) into a spac package:
trunk graphs (embedding, per-layer attention with explicit KV cache + router + shared experts,
final norm + lm_head), one ONNX subgraph per routed expert with its weights in its own file
(the paging unit), the draft's graphs, the tokenizer, and manifest.yaml with every file's sha256.
Without --draft the package has no draft model: spac-run then decodes with the target alone or
drafts with the target itself (spac-run --draft self), best from int4 copies of its experts
(--draft-experts int4), which the runtime holds in memory while the full experts are paged.

At the end the package is run with ONNX Runtime and compared with the transformers model
(16-token prompt + 8 cached decode steps); the max abs logit difference is printed."""

EPILOG = """\
supported MoE families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, dots1,
                        hunyuan_v1_moe, llama4_text (top-1), gpt_oss; others whose parts are
                        known (e.g. glm4_moe) are recognised from their modules
supported drafts:       llama, mistral, qwen2, qwen3 (same tokenizer as the target)

--force replaces only a spac package (or an empty folder), never the model or draft directory or a
folder holding them. Folders that killed exports left beside the output (.NAME.partial-PID-*,
.NAME.old-PID) are removed by the next export once their process is gone.

examples:
  spac-export models/qwen3-moe --draft models/qwen3-draft -o packages/qwen3-moe
  spac-export models/qwen3-moe -o packages/qwen3-moe-nodraft
  spac-export models/qwen3-moe --draft-experts int4 -o packages/qwen3-moe-selfdraft"""


def parse_args(argv):
    parser = Parser(prog="spac-export", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="target MoE model directory (saved with save_pretrained)")
    parser.add_argument("--draft", type=Path, default=None,
                        help="draft model directory (dense, same tokenizer); omitted: a package without a draft")
    parser.add_argument("-o", "--output", type=Path, required=True, help="package directory to create")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="weight and activation dtype of the package (default: float32)")
    parser.add_argument("--experts", choices=["float", "int8", "int4"], default="float",
                        help="routed experts' weights: the package dtype, or block-quantized for ONNX Runtime's "
                             "MatMulNBits (float32 to int8: 3.5x fewer bytes, to int4: 6.2x at block 32, 7.5x at 128; default: float)")
    parser.add_argument("--trunk", choices=["float", "int8", "int4"], default="float",
                        help="the same for the target's trunk matmuls (attention, shared experts, LM head; "
                             "routers stay float)")
    parser.add_argument("--draft-experts", choices=["int8", "int4"], default=None,
                        help="also write a copy of every routed expert so block-quantized (fewer bits than "
                             "--experts), which `spac-run --draft self` holds in memory and drafts with: "
                             "speculative decoding without a draft model, the output still the full model's "
                             "(default: no copies)")
    parser.add_argument("--block-size", type=int, choices=CLI_BLOCK_SIZES, default=DEFAULT_BLOCK_SIZE,
                        help="weights per quantization block along the input dimension; it must divide every "
                             "quantized weight's input dimension. Larger blocks are fewer bytes and decode faster "
                             "on the CPU (int4, 128 symmetric: 1.37x the tok/s of 32), with more error (default: 32)")
    parser.add_argument("--symmetric", action="store_true",
                        help="symmetric blocks (no zero points) instead of the default asymmetric ones")
    parser.add_argument("--force", action="store_true",
                        help="replace the output if it is a spac package (never any other folder)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the final comparison with the transformers model")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_logging_flags(parser)
    return parser.parse_args(argv)


def summary(result) -> str:
    from spac.runtime.profile import format_bytes

    manifest = result.manifest
    target, draft = manifest["target"], manifest["draft"]
    draft_name = f"draft {draft['architecture']}" if draft else "no draft"
    draft_layers = f", draft {draft['dims']['num_layers']}" if draft else ""
    experts = target["experts"]
    moe_layers = sum(layer["kind"] == "moe" for layer in target["layers"])
    expert_files = moe_layers * target["dims"]["num_experts"]
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    copies = target.get("draft_experts")
    copies_row = [("draft copies", f"{describe_quantization(copies['quantization'])}, "
                                   f"{format_bytes(copies['bytes_per_expert'] * expert_files)}")] if copies else []
    rows = [
        ("package", str(result.output)),
        ("architecture", f"{target['architecture']} + {draft_name}"),
        ("layers", f"{target['dims']['num_layers']} ({moe_layers} MoE){draft_layers}"),
        ("experts", f"{target['dims']['num_experts']} per MoE layer, top-{target['dims']['top_k']}, "
                    f"{expert_files} files ({experts['spec']['variant']})"),
        ("bytes per expert", format_bytes(experts["bytes_per_expert"])),
        ("expert bytes", format_bytes(experts["bytes_per_expert"] * expert_files)),
        *copies_row,
        ("total bytes", format_bytes(total)),
        ("files", str(len(manifest["files"]) + 1)),
        ("dtype", manifest["dtype"]),
        ("quantization", quantization_summary(experts.get("quantization"), target.get("trunk_quantization"))),
    ]
    report = result.verification
    if report:
        draft_diff = report["draft_max_abs_diff"]
        draft_diff = (f", draft {draft_diff:.2e} (tolerance {report['tolerance']:g})"
                      if draft_diff is not None else "")
        rows.append(("verification", f"passed: max abs logit diff target {report['target_max_abs_diff']:.2e} "
                                     f"(tolerance {report['target_tolerance']:.2g}){draft_diff}"))
    else:
        rows.append(("verification", "skipped (--no-verify)"))
    rows.append(("time", f"{result.seconds:.1f} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def describe_quantization(q: dict | None) -> str:
    if q is None:
        return "float"
    return f"int{q['bits']} ({'symmetric' if q['symmetric'] else 'asymmetric'}, blocks of {q['block_size']})"


def quantization_summary(experts: dict | None, trunk: dict | None) -> str:
    return f"experts {describe_quantization(experts)}, trunk {describe_quantization(trunk)}"


def quiet_exporter_logs() -> None:
    # The dynamo exporter logs one warning per missing optional op library (torchvision) and a
    # few deprecation notes; none concern the user.
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def sigterm_as_exit():
    """SIGTERM raises SystemExit, so the export removes its temporary folder on the way out.
    (SIGKILL cannot be caught; the next export removes what such an export left.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging("spac-export", args)
    quiet_exporter_logs()
    from .families import ExportError
    from .package import ExportOptions, export_package
    from .verify import verify_package

    options = ExportOptions(args.model, args.draft, args.output, args.dtype, args.force, args.verify,
                            progress=not args.quiet, experts=args.experts, trunk=args.trunk,
                            block_size=args.block_size, symmetric=args.symmetric, draft_experts=args.draft_experts)
    try:
        with sigterm_as_exit():
            result = export_package(options, verify_fn=verify_package)
    except ExportError as error:
        print(f"spac-export: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno == errno.ENOSPC:  # the disk filled up: the user's to fix, like bad input
            print(f"spac-export: error: no space left on the device holding {args.output.absolute().parent} while "
                  f"writing the package ({error.strerror}); nothing was left behind: free some space or choose another -o",
                  file=sys.stderr)
            return 2
        print(f"spac-export: error: writing the package failed: {error}; nothing was left behind", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
