"""Weight-only block quantization in ONNX Runtime's `com.microsoft.MatMulNBits` format.

A weight W [K, N] (x @ W) is stored per output column n in blocks of `block_size` consecutive
input rows: `q` uint8 [N, K / block_size, block_size * bits / 8] (4 bits: two values a byte,
the lower nibble first), `scales` [N, K / block_size] in the package dtype and, when asymmetric,
`zero_points` uint8 [N, ceil(K / block_size * bits / 8)]; symmetric blocks have the implicit
zero point 2^(bits-1). W[k, n] = (q - zero_point) * scale of its block. Every input dimension
must be a multiple of the block size (the exporter refuses others rather than pad).

MatMulNBits runs with accuracy_level 4: activations are quantized to int8 per block and the
products run on integer dot-product kernels, as llama.cpp does for its Q4_0/Q8_0 formats.
Measured (ORT 1.32 CPU, 2048 x 768, 1 token, 2 threads): int4 0.18 ms at level 0 (float
compute) against 0.10 ms at level 4; int8 4.4 ms against 0.05 ms, because at level 0 int8
weights have no packed kernel. The activations' rounding adds about 1e-3 relative error.
Only weights that ONNX Runtime sees as initializers are prepacked; fed as graph inputs, int4
takes 7-10 ms for the same product, so paged quantized experts run as sessions of their own
(spac.ops.experts.ExpertKernel.prepare).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import helper

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128)  # MatMulNBits takes powers of two from 16
DEFAULT_BLOCK_SIZE = 32
CLI_BLOCK_SIZES = tuple(size for size in BLOCK_SIZES if size >= DEFAULT_BLOCK_SIZE)  # what spac-export offers
ACCURACY_LEVEL = 4  # int8 activations (see above)
CONTRIB_DOMAIN = "com.microsoft"
PARTS = ("q", "scales", "zero_points")  # a quantized weight's tensors, named WEIGHT.PART


@dataclass(frozen=True)
class BlockQuantization:
    bits: int
    block_size: int
    symmetric: bool

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def as_dict(self) -> dict:
        """The manifest's mapping."""
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric}

    def blocks(self, k: int) -> int:
        return k // self.block_size

    def shapes(self, k: int, n: int) -> list[tuple[str, tuple[int, ...], str | None]]:
        """(part, shape, dtype) of a quantized [K, N] weight in file order; dtype None: the
        package's float dtype."""
        blocks = self.blocks(k)
        parts = [("q", (n, blocks, self.block_size * self.bits // 8), "uint8"), ("scales", (n, blocks), None)]
        if not self.symmetric:
            parts.append(("zero_points", (n, -(-blocks * self.bits // 8)), "uint8"))
        return parts

    def refusal(self, k: int) -> str | None:
        """Why a weight with input dimension k cannot be quantized, or None."""
        if k % self.block_size:
            return f"its input dimension {k} is not a multiple of the block size {self.block_size}"
        return None

    def node(self, x: str, weight: str, output: str, k: int, n: int, name: str = "") -> "helper.NodeProto":
        """The MatMulNBits node computing x @ weight from the tensors WEIGHT.q, .scales(, .zero_points)."""
        inputs = [x, f"{weight}.q", f"{weight}.scales"] + ([] if self.symmetric else [f"{weight}.zero_points"])
        return helper.make_node("MatMulNBits", inputs, [output], name=name, domain=CONTRIB_DOMAIN, K=k, N=n,
                                bits=self.bits, block_size=self.block_size, accuracy_level=ACCURACY_LEVEL)


def from_dict(data: dict | None) -> BlockQuantization | None:
    """The manifest's mapping (already validated), or None for float weights."""
    return None if data is None else BlockQuantization(data["bits"], data["block_size"], data["symmetric"])
