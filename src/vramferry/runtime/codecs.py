"""Lossless codecs for host copies: a piece's bytes kept compressed in the host store, decoded on the way in.

Dense bf16 weights compress without loss because their exponents carry ~2.7 of their 8 high bits: split every
16-bit word into its low byte (1 exponent bit + 7 mantissa bits, close to random) and its high byte (sign and 7
exponent bits), and an entropy coder shrinks the high plane to about a third. Two handlers, chosen by the
execution device (:data:`CODECS`):

- ``zstd-planes`` (CPU): the low plane kept as it is, the high plane compressed with ``zstandard``. An exact
  round trip that runs the same store, planner and schedule as the GPU codec, so CPU tests cover them.
- ``nvcomp-ans`` (CUDA): NVIDIA nvCOMP's ANS entropy coder over each chunk with the 16-bit float type hint
  (measured on an H200: 0.685 of the bytes, decoding at ~231 GB/s), decoded on the device on its own stream.

A piece is encoded in chunks of ``CHUNK_BYTES`` (:mod:`vramferry.planning.codec`), so that the device staging
buffers hold one chunk rather than one block (two chunks of ~45 MB compressed instead of two FLUX.1 blocks of
~450 MB), and the copy of one chunk overlaps the decode of the one before even within a block. Both handlers need
an optional package (``pip install vramferry[compress]``); each is imported only when used.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..errors import CodecUnavailable, DeviceError, OffloadError
from ..planning.codec import CHUNK_BYTES

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vramferry[compress]'"



@dataclass(frozen=True)
class Chunk:
    """Where one chunk lies: ``[raw_start, raw_start + raw_len)`` of the piece, ``[start, start + length)`` of the
    payload; ``split`` is the codec's own mark inside it (``zstd-planes``: the end of the raw low plane)."""

    raw_start: int
    raw_len: int
    start: int
    length: int
    split: int = 0


@dataclass(eq=False)
class Encoded:
    """A piece's bytes as its codec left them: ``payload`` (host uint8, in the store) decodes to ``nbytes``.

    Attributes:
        codec: the handler that made it (and decodes it).
        payload: the compressed chunks back to back, in host memory (page-locked like the store's arenas).
        nbytes: the bytes it decodes to.
        chunks: where each chunk lies in the piece and in the payload, in order.
    """

    codec: Codec
    payload: torch.Tensor
    nbytes: int
    chunks: tuple[Chunk, ...]

    @property
    def ratio(self) -> float:
        return self.payload.numel() / max(1, self.nbytes)

    @property
    def largest_chunk(self) -> int:
        return max(c.length for c in self.chunks)

    def decode_into(self, out: torch.Tensor) -> None:
        """Decode into ``out`` (uint8, ``nbytes`` long, on the CPU), synchronously."""
        for chunk in self.chunks:
            self.codec.decode_chunk(
                self.payload[chunk.start : chunk.start + chunk.length],
                chunk.split,
                out[chunk.raw_start : chunk.raw_start + chunk.raw_len],
            )


def encode_piece(codec: Codec, raws: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> list[Encoded]:
    """Encode each of ``raws`` (flat uint8 host tensors) in chunks of ``chunk_bytes``, all chunks in one batch."""
    pieces = []
    for raw in raws:
        _planes(raw)
        step = chunk_bytes - chunk_bytes % 2
        pieces.append([raw[i : i + step] for i in range(0, raw.numel(), step)])
    coded = iter(codec.encode_chunks([c for chunks in pieces for c in chunks]))
    found = []
    for raw, chunks in zip(raws, pieces, strict=True):
        parts = [next(coded) for _ in chunks]
        payload = torch.empty(sum(p.numel() for p, _split in parts), dtype=torch.uint8)
        table, at, raw_at = [], 0, 0
        for (data, split), chunk in zip(parts, chunks, strict=True):
            payload[at : at + data.numel()] = data
            table.append(Chunk(raw_at, chunk.numel(), at, data.numel(), split))
            at, raw_at = at + data.numel(), raw_at + chunk.numel()
        found.append(Encoded(codec, payload, raw.numel(), tuple(table)))
    return found


class Codec:
    """What a codec handler does: encode chunks of raw bytes, decode one back. ``name`` is its name in stats;
    ``format`` names the layout of its compressed bytes: two handlers of the same format decode each other's
    bytes (the compressed cache, :mod:`~vramferry.runtime.cache`, keeps bytes only for the format that made them).
    """

    name = "raw"
    format = "raw"
    device_type = "cpu"  # where its decode runs

    @property
    def params(self) -> dict:
        """Its settings and library version, as recorded beside compressed bytes (informative: ``format`` decides)."""
        return {}

    def encode_chunks(self, raws: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:  # pragma: no cover
        """Per chunk its compressed bytes (host uint8) and the codec's mark inside them."""
        raise NotImplementedError

    def decode_chunk(self, data: torch.Tensor, split: int, out: torch.Tensor) -> None:  # pragma: no cover
        """Decode one chunk's compressed bytes (host) into ``out`` (host), synchronously."""
        raise NotImplementedError

    def encode(self, raw: torch.Tensor) -> Encoded:
        """Encode one flat uint8 host tensor (in chunks)."""
        return encode_piece(self, [raw])[0]


class ZstdPlanes(Codec):
    """The CPU codec: low bytes kept, high bytes compressed with zstd. Exact for any bytes (an even count)."""

    name = "zstd-planes"
    # The low plane as it is, then one zstd frame of the high plane; zstd frames decode with any zstd version.
    format = "zstd-planes/1"
    device_type = "cpu"

    def __init__(self, level: int = 3) -> None:
        try:
            import zstandard
        except ImportError:
            raise CodecUnavailable(
                f"compression on the CPU needs the zstandard package; install it with {INSTALL_HINT}, "
                "or set compression='off'"
            ) from None
        self._zstd = zstandard
        self.level = level

    @property
    def params(self) -> dict:
        return {"level": self.level, "zstandard": self._zstd.__version__}

    def encode_chunks(self, raws: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        compressor = self._zstd.ZstdCompressor(level=self.level)
        found = []
        for raw in raws:
            planes = _planes(raw)
            low = planes[:, 0].contiguous()
            packed = compressor.compress(planes[:, 1].contiguous().numpy().tobytes())
            data = torch.empty(low.numel() + len(packed), dtype=torch.uint8)
            data[: low.numel()] = low
            data[low.numel() :] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            found.append((data, low.numel()))
        return found

    def decode_chunk(self, data: torch.Tensor, split: int, out: torch.Tensor) -> None:
        high = self._zstd.ZstdDecompressor().decompress(data[split:].numpy().tobytes(), max_output_size=split)
        planes = out.view(-1, 2)
        planes[:, 0].copy_(data[:split])
        planes[:, 1].copy_(torch.frombuffer(bytearray(high), dtype=torch.uint8))


class NvcompAns(Codec):
    """The GPU codec: nvCOMP ANS over each chunk, the bytes read as 16-bit floats.

    Encoding runs on the device (a batch of chunks is copied in, encoded, and the compressed bytes copied back);
    decoding runs on the stream the caller passes, from compressed bytes already on the device.
    """

    name = "nvcomp-ans"
    device_type = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.nvcomp = import_nvcomp()
        self.device = device
        self._codecs: dict[int, object] = {}
        self._direct: bool | None = None  # decode writes into a given output array (probed on first use)
        # (stream, decoded bytes) -> nvCOMP DecompressConfig; None once nvCOMP turned the configs down.
        self._configs: dict[tuple[int, int], object] | None = {}

    @property
    def format(self) -> str:
        # nvCOMP's own framing of each chunk, as its version writes it: a cache made by another major.minor
        # release is made again rather than trusted.
        version = str(getattr(self.nvcomp, "__version__", "unknown"))
        return f"nvcomp-ans/1 nvcomp {'.'.join(version.split('.')[:2])}"

    @property
    def params(self) -> dict:
        return {"algorithm": "ANS", "data_type": "<f2", "nvcomp": str(getattr(self.nvcomp, "__version__", "unknown"))}

    def _codec(self, stream: torch.cuda.Stream) -> object:
        """One nvCOMP codec per stream: a codec holds scratch state and runs all its work on its stream."""
        key = stream.cuda_stream
        if key not in self._codecs:
            self._codecs[key] = self.nvcomp.Codec(
                algorithm="ANS", data_type="<f2", device_id=self.device.index or 0, cuda_stream=key
            )
        return self._codecs[key]

    def encode_chunks(self, raws: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        stream = torch.cuda.current_stream(self.device)
        codec = self._codec(stream)
        on_device = [raw.to(self.device).view(torch.float16) for raw in raws]
        arrays = [self.nvcomp.as_array(t) for t in on_device]
        try:
            encoded = codec.encode(arrays)  # one batch
        except TypeError:  # a build without batched encode: one call per chunk
            encoded = [codec.encode(array) for array in arrays]
        found = []
        for array in encoded:
            size = int(array.buffer_size)
            data = torch.from_dlpack(array).view(torch.uint8).reshape(-1)[:size]
            found.append((data.to("cpu"), 0))
        return found

    def decode_on(self, staged: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream) -> object:
        """Queue the decode of ``staged`` (one chunk's compressed bytes on the device) into ``out`` on ``stream``.

        nvCOMP writes straight into ``out`` where its ``decode`` takes an output array; otherwise it decodes into
        a buffer of its own, copied into ``out`` on the same stream. Returns what must stay alive until the
        stream has run (that buffer), or ``None``.
        """
        codec = self._codec(stream)
        source = self.nvcomp.as_array(staged)
        if self._direct is not False:
            try:
                target = self.nvcomp.as_array(out.view(torch.float16))
                config = self._decompress_config(codec, stream, out.numel())
                if config is not None:
                    codec.decode(source, out=target, decompression_config=config)
                else:
                    codec.decode(source, out=target)
                self._direct = True
                return None
            except (TypeError, ValueError, RuntimeError) as err:
                if self._direct:
                    raise
                logger.debug("nvCOMP decode takes no output array (%s); decoding through a copy", err)
                self._direct = False
        decoded = codec.decode(source)
        result = torch.from_dlpack(decoded).view(torch.uint8).reshape(-1)
        with torch.cuda.stream(stream):
            out.copy_(result[: out.numel()], non_blocking=True)
        return decoded

    def _decompress_config(self, codec: object, stream: torch.cuda.Stream, nbytes: int) -> object | None:
        """A decompression config for chunks that decode to ``nbytes``, built from that size: given one, nvCOMP's
        decode never parses the compressed header on the host, which would synchronise the stream and stall the
        copies and the compute queued behind it. ``None`` where this nvCOMP build has no such configs."""
        if self._configs is None:
            return None
        key = (stream.cuda_stream, nbytes)
        config = self._configs.get(key)
        if config is None:
            try:
                config = codec.decompression_config(codec.compression_config(nbytes))
            except (AttributeError, TypeError, ValueError, RuntimeError) as err:
                logger.warning("vramferry: nvCOMP builds no decompression config (%s); each decode synchronises", err)
                self._configs = None
                return None
            self._configs[key] = config
        return config

    def decode_chunk(self, data: torch.Tensor, split: int, out: torch.Tensor) -> None:
        stream = torch.cuda.current_stream(self.device)
        target = torch.empty(out.numel(), dtype=torch.uint8, device=self.device)
        keep = self.decode_on(data.to(self.device), target, stream)
        out.copy_(target.cpu())  # restore only: the caller wants host bytes now (a synchronous copy)
        del keep


def import_nvcomp():
    """nvCOMP's Python module, or a :class:`CodecUnavailable` naming the package to install."""
    try:
        from nvidia import nvcomp
    except ImportError:
        raise CodecUnavailable(
            "lossless compression on the GPU needs nvCOMP (the nvidia-nvcomp wheel matching torch's CUDA); "
            f"install it with {INSTALL_HINT}, or set compression='off'"
        ) from None
    return nvcomp


#: Codec name -> its handler (``vramferry compress --codec``).
CODEC_NAMES: dict[str, Callable[[torch.device], Codec]] = {
    "zstd-planes": lambda device: ZstdPlanes(),
    "nvcomp-ans": NvcompAns,
}
#: Execution device type -> the name of the codec that runs there.
DEVICE_CODECS = {"cpu": "zstd-planes", "cuda": "nvcomp-ans"}
#: Execution device type -> the codec handler that runs there.
CODECS: dict[str, Callable[[torch.device], Codec]] = {kind: CODEC_NAMES[name] for kind, name in DEVICE_CODECS.items()}


def codec_named(name: str, device: torch.device) -> Codec:
    """The codec called ``name`` (:data:`CODEC_NAMES`); ``nvcomp-ans`` encodes on ``device``, a CUDA device."""
    if name not in CODEC_NAMES:
        raise OffloadError(f"codec: {name!r} is not one of {', '.join(CODEC_NAMES)}")
    if name == "nvcomp-ans" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise DeviceError(
            "codec nvcomp-ans encodes on a CUDA device, and none is visible; run it on the GPU machine, or use "
            "--codec zstd-planes for runs on the CPU"
        )
    return CODEC_NAMES[name](device)


def codec_for(device: torch.device) -> Codec:
    """The lossless codec for ``device``; raises :class:`CodecUnavailable` when its package is missing."""
    make = CODECS.get(device.type)
    if make is None:
        raise OffloadError(
            f"compression: no lossless codec runs on {device.type!r} devices; known: {', '.join(CODECS)}; "
            "set compression='off'"
        )
    return make(device)


def _planes(raw: torch.Tensor) -> torch.Tensor:
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() % 2:
        raise ValueError(f"a codec takes a flat uint8 tensor of an even length, got {raw.dtype} {tuple(raw.shape)}")
    return raw.view(-1, 2)


# -- estimates (reading the weights; no device needed) ------------------------------------------------------

#: Bits the entropy coder spends beyond the high plane's entropy (table headers, chunking, rounding).
CODER_OVERHEAD_BITS = 0.25
#: High bytes sampled for the histogram: windows of consecutive words spread evenly over all the tensors' bytes
#: together, so that estimating a memory-mapped checkpoint faults in a few hundred pages per component, not every
#: page (nor a few of every tensor: scattered faults on a cold disk cost ~1 ms each).
SAMPLE_WINDOWS, SAMPLE_WINDOW = 256, 4096


def estimated_ratio(tensors: Iterable[torch.Tensor]) -> float | None:
    """The fraction of these tensors' bytes a byte-plane entropy coder would keep, from the histogram of the
    high byte of every 16-bit word (sampled): ``(8 + H(high) + overhead) / 16``. ``None`` when none can be read
    (meta tensors, tensor subclasses)."""
    planes = []
    for tensor in tensors:
        if tensor.device.type == "meta" or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            continue
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0 or flat.element_size() % 2:
            continue
        planes.append(flat.view(torch.uint8).view(-1, 2))
    if not planes:
        return None
    counts = torch.zeros(256, dtype=torch.float64)
    for words, start in _sample_windows(planes):
        high = words[start : start + SAMPLE_WINDOW, 1]
        counts += torch.bincount(high.to("cpu", torch.int64), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log2()).sum())
    return min(1.0, (8 + entropy + CODER_OVERHEAD_BITS) / 16)


def _sample_windows(planes: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """``(words, start)`` of the sampled windows: every word when they are few, else :data:`SAMPLE_WINDOWS`
    windows at even steps through the tensors laid end to end (each window inside one tensor)."""
    sizes = [words.shape[0] for words in planes]
    total = sum(sizes)
    if total <= SAMPLE_WINDOWS * SAMPLE_WINDOW:
        return [(words, start) for words in planes for start in range(0, words.shape[0], SAMPLE_WINDOW)]
    ends = list(itertools.accumulate(sizes))
    found = []
    for k in range(SAMPLE_WINDOWS):
        at = k * total // SAMPLE_WINDOWS
        index = bisect.bisect_right(ends, at)
        inside = at - (ends[index] - sizes[index])
        found.append((planes[index], max(0, min(inside, sizes[index] - SAMPLE_WINDOW))))
    return found


class EstimatedRatios(Mapping):
    """:func:`estimated_ratios` of ``modules``, read from the weights when first looked at (a plan that moves no
    weight never looks, and a cold checkpoint's pages stay unread)."""

    def __init__(self, modules) -> None:
        self._modules = modules
        self._found: dict[str, float] | None = None

    def _ratios(self) -> dict[str, float]:
        if self._found is None:
            self._found = estimated_ratios(self._modules)
        return self._found

    def __getitem__(self, name: str) -> float:
        return self._ratios()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ratios())

    def __len__(self) -> int:
        return len(self._ratios())


def estimated_ratios(modules) -> dict[str, float]:
    """Per component of ``modules`` (a :class:`~vramferry.discovery.modules.PipelineModules`), its estimated
    ratio (:func:`estimated_ratio`); components whose weights cannot be read are left out."""
    found = {}
    for component in modules.components():
        tensors = [*component.module.parameters(), *component.module.buffers()]
        ratio = estimated_ratio(tensors)
        if ratio is not None:
            found[component.name] = ratio
    return found


@dataclass(frozen=True)
class CodecChoice:
    """What ``apply`` compresses with: the codec (``None``: none), the ratios the planner prices it with
    (``None``: the planner does not consider compression), and why no codec runs where ``auto`` might want one."""

    codec: Codec | None
    ratios: Mapping[str, float] | None
    missing: str | None = None


def select_codec(compression, device: torch.device, modules) -> CodecChoice:
    """The codec for ``compression`` (a :class:`~vramferry.config.Compression`) on ``device``.

    ``off``: none. ``auto``: the device's codec when its package is installed (never on a CPU execution device:
    no link to save there). ``lossless``: the device's codec, or :class:`CodecUnavailable` naming the package.
    """
    value = str(compression)
    if value == "off" or value == "auto" and device.type == "cpu":
        return CodecChoice(None, None)
    try:
        codec = codec_for(device)
    except CodecUnavailable as err:
        if value == "lossless":
            raise
        return CodecChoice(None, None, str(err))
    return CodecChoice(codec, EstimatedRatios(modules))
