"""Row chunks: how QFT's weight-sized work is cut into pieces (shared by the weight type and IntLion)."""

from __future__ import annotations

import math
from collections.abc import Iterator

# Weight-sized work (dequantize, weight gradient + its int8 quantization, the optimizer update) runs over row chunks
# of about this many entries, so that no weight-sized float temporary exists (a chunk's are 4 MiB in float32). The
# size trades the matmul's efficiency (a chunk of a 2048-wide weight is 512 rows: small row counts make the chunked
# products slower than one dense product) against cache reuse of the elementwise passes (compiled into single
# passes, see peqa_peft.core.kernels). Measured at hidden 2048 (Xeon with AMX, one thread, steps interleaved in one
# process): 256 Ki -> 1 Mi entries cut the QFT step by ~15%; 2-4 Mi slow the update again. The results do not depend
# on it (tests vary it).
CHUNK_ELEMENTS = 1 << 20


def row_chunks(rows: int, row_len: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """Consecutive ``(r0, r1)`` row ranges of about ``CHUNK_ELEMENTS`` entries covering ``rows`` rows.

    Every range starts at a flat offset ``r0 * row_len`` that is a multiple of ``align`` (the optimizer's momentum
    block size), so a chunk holds whole momentum blocks (the last one may be partial at the tensor's end).
    """
    step = align // math.gcd(row_len, align)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, row_len * step)) * step
    for r0 in range(0, rows, per_chunk):
        yield r0, min(rows, r0 + per_chunk)


__all__ = ["CHUNK_ELEMENTS", "row_chunks"]
