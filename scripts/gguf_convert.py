"""llama.cpp as a peer in the benchmarks: where it is, and its own converter turning a Hugging
Face folder into GGUF.

Every benchmark takes llama.cpp the same way: `--llama-cpp DIR` (or $SPAC_LLAMA_CPP), a
llama.cpp source folder with its tools built under build/bin; without it llama.cpp is skipped.

convert_hf_to_gguf.py refuses our tokenizers' unknown pre-tokenizer hash, so it runs with its
lookup (TextModel.get_vocab_base_pre, in conversion/base.py in newer trees) patched to return
the default pre-tokenizer; the weights are converted as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_ENVIRONMENT = "SPAC_LLAMA_CPP"

PATCHED_CONVERTER = (
    "import sys; sys.path[:0] = [{root!r}, {root!r} + '/gguf-py']; sys.argv = {argv!r}\n"
    "import convert_hf_to_gguf as c\n"
    "base = getattr(c, 'TextModel', None) or __import__('conversion.base', fromlist=['x']).TextModel\n"
    "base.get_vocab_base_pre = lambda self, tokenizer: 'default'\n"
    "c.main()\n")


def add_llama_cpp_argument(parser: argparse.ArgumentParser, tools: str) -> None:
    """--llama-cpp DIR, defaulting to $SPAC_LLAMA_CPP; `tools` names the build/bin tools used."""
    parser.add_argument("--llama-cpp", type=Path, default=os.environ.get(LLAMA_CPP_ENVIRONMENT),
                        help=f"a llama.cpp source folder with {tools} built under build/bin "
                             f"(default: ${LLAMA_CPP_ENVIRONMENT}); absent: llama.cpp is skipped")


def llama_cpp_binaries(folder: Path) -> Path:
    return folder / "build" / "bin"


# spac's block-quantized experts -> the llama.cpp type of the same bits and block size
LLAMA_TYPE_OF_BITS = {4: "Q4_0", 8: "Q8_0"}


def quantize_gguf(llama_cpp: Path, f32: Path, llama_type: str) -> Path:
    """`f32` quantized by llama-quantize to `llama_type` beside it (kept if it exists; atomic)."""
    out = f32.with_name(f32.name.removesuffix("-f32.gguf") + f"-{llama_type.lower()}.gguf")
    if out.exists():
        return out
    partial = out.with_name(out.name + ".partial")
    subprocess.run([str(llama_cpp_binaries(llama_cpp) / "llama-quantize"), str(f32), str(partial), llama_type],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.replace(partial, out)
    return out


def gguf_path(model_dir: Path, work: Path, outtype: str = "f32") -> Path:
    """Where `model_dir`'s conversion is cached in `work`: named by a digest of the folder's
    path and of its files' names, sizes and times, so that another model of the same folder name
    (the testbeds are all small-moe), or the same folder remade, never reuses it."""
    model_dir = Path(model_dir).resolve()
    digest = hashlib.sha256(str(model_dir).encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            info = path.stat()
            digest.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns};".encode())
    return Path(work) / f"{model_dir.name}-{digest.hexdigest()[:12]}-{outtype}.gguf"


def convert_to_gguf(source_root: Path, model_dir: Path, work: Path, outtype: str = "f32") -> Path:
    """`model_dir` as GGUF in `work` (kept there, see gguf_path; written atomically), by the
    converter in the llama.cpp source folder `source_root`."""
    gguf = gguf_path(model_dir, work, outtype)
    if gguf.exists():
        return gguf
    partial = str(gguf) + ".partial"
    code = PATCHED_CONVERTER.format(root=str(source_root), argv=["convert_hf_to_gguf.py", str(model_dir),
                                                                 "--outtype", outtype, "--outfile", partial])
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    os.replace(partial, gguf)
    return gguf
