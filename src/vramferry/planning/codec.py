"""What compression costs and saves, as plain data for the cost model (no device, no weights read here).

A compressed piece crosses the link as ``ratio × bytes`` and is then decoded on the device at
:attr:`~vramferry.planning.devices.DeviceProfile.decode_bytes_per_s` (bytes of output per second), on a stream of
its own beside the copies and the compute; the decode takes SMs from the compute stream, which loses
``decode_contention`` of each decode's time. The ratio per component comes from the weights' exponent histogram
when they can be read (:func:`vramferry.runtime.codecs.estimated_ratios`), else from :data:`DEFAULT_RATIOS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Compression

#: Fraction of the bytes left after compression when the weights cannot be read (meta tensors), per dtype.
#: bf16: 0.685 measured with nvCOMP ANS on N(0, 0.02) weights on an H200; DFloat11 reports 0.686 on FLUX.1-dev.
DEFAULT_RATIOS = {"torch.bfloat16": 0.69, "torch.float16": 0.88, "torch.float32": 0.84}
#: Compress a component only where it keeps at most this fraction of its bytes: above it the gain cannot pay
#: for the decode and the staging buffers.
WORTHWHILE_RATIO = 0.95
#: ``auto`` compresses only when the request is predicted at least this much faster.
AUTO_GAIN = 0.02
LOSSLESS = "lossless"
RAW = "raw"


@dataclass(frozen=True)
class CodecEstimate:
    """Per component the fraction of its bytes compression keeps, and where each figure came from."""

    ratios: Mapping[str, float]
    sources: Mapping[str, str]


def codec_estimate(inventory, measured: Mapping[str, float] | None = None) -> CodecEstimate:
    """Per component worth compressing (its ratio ≤ :data:`WORTHWHILE_RATIO`): ``measured`` where given (from the
    exponent histogram), else the default of its dtype. Components of tensor subclasses are left raw."""
    ratios, sources = {}, {}
    for size in inventory.components:
        if size.formats:
            continue
        if measured and size.name in measured:
            ratio, source = float(measured[size.name]), "estimated from the weights' exponent histogram"
        elif size.dtype in DEFAULT_RATIOS:
            ratio, source = DEFAULT_RATIOS[size.dtype], f"assumed for {size.dtype.removeprefix('torch.')}"
        else:
            continue
        if ratio <= WORTHWHILE_RATIO:
            ratios[size.name], sources[size.name] = ratio, source
    return CodecEstimate(ratios, sources)


def wanted(compression: Compression, mode_moves: bool) -> bool:
    """Whether to price compressed plans at all."""
    return mode_moves and compression is not Compression.OFF


def keep_compressed(compression: Compression, raw_s: float, compressed_s: float) -> bool:
    """``lossless`` always keeps the compressed plan; ``auto`` when it is :data:`AUTO_GAIN` faster."""
    if compression is Compression.LOSSLESS:
        return True
    return compressed_s < (1 - AUTO_GAIN) * raw_s


def load_seconds(nbytes: int, ratio: float, bandwidth: float, decode_bytes_per_s: float) -> float:
    """Seconds to load ``nbytes`` of weights kept at ``ratio`` (1: raw): the copy and the decode pipelined piece
    by piece, so the slower of the two sets the pace."""
    copy = ratio * nbytes / bandwidth
    if ratio >= 1:
        return copy
    return max(copy, nbytes / decode_bytes_per_s)


#: The two device buffers compressed chunks land in before they are decoded (rounded to 2 MiB segments).
STAGING_BUFFERS = 2
#: Raw bytes per encoded chunk (:data:`vramferry.runtime.codecs.CHUNK_BYTES`).
CHUNK_BYTES = 64 * 2**20


def staging_bytes(largest_piece: int, ratio: float) -> int:
    """Device bytes of the staging buffers for a component whose largest moved piece is ``largest_piece``: two
    compressed chunks (a chunk that does not compress is kept at its raw size, hence the bound of one)."""
    segment = 2 * 2**20
    chunk = min(largest_piece, CHUNK_BYTES) * min(1.0, ratio + 0.05)
    return STAGING_BUFFERS * (-(-int(chunk) // segment) * segment)
