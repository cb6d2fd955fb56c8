"""``vramferry compress MODEL_DIR``: the compressed cache beside a local checkpoint (:mod:`vramferry.compressor`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_options import EXIT_OK, _comma_list, add_offload_options, fit_to_machine, offload_config
from .units import format_bytes


def cmd_compress(args: argparse.Namespace) -> int:
    from .compressor import compress

    config = fit_to_machine(offload_config(args))
    report = compress(
        args.model_dir,
        config,
        codec=args.codec,
        cache_dir=args.cache_dir,
        components=args.components,
        rehash=args.rehash,
        progress=not args.quiet,
    )
    if report.nothing is not None:
        print(f"note: nothing to compress: {report.nothing}", file=sys.stderr)
        return EXIT_OK
    done = f"compressed {report.written} piece(s) with {report.codec}"
    if report.written:
        rate = report.raw_bytes / report.seconds / 1e9 if report.seconds > 0 else 0.0
        done += (
            f": {format_bytes(report.raw_bytes)} -> {format_bytes(report.compressed_bytes)} "
            f"(x{report.compressed_bytes / report.raw_bytes:.3f}) in {report.seconds:.2f} s ({rate:.2f} GB/s)"
        )
    removed = f", {report.removed} stale entries removed" if report.removed else ""
    print(f"{done}; {report.kept} up to date{removed}")
    if report.not_from_files:
        shown = ", ".join(report.not_from_files[:4]) + (" ..." if len(report.not_from_files) > 4 else "")
        print(
            f"note: {len(report.not_from_files)} piece(s) left out, their weights are not all read from the "
            f"checkpoint files (apply compresses them itself): {shown}",
            file=sys.stderr,
        )
    print(f"cache: {report.cache_dir}")
    return EXIT_OK


def add_compress(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compress",
        parents=[common],
        help="write the compressed cache beside a local checkpoint, read by apply and load",
        description="Compress the pieces that the plan for these offload options keeps compressed (every piece a "
        "codec could keep, with --compression lossless) and write them to MODEL_DIR/.vramferry/compressed: apply "
        "and vramferry.load then read them instead of compressing at start, wherever they match the weights.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a local diffusers pipeline folder (save_pretrained)")
    p.add_argument(
        "--codec",
        choices=["nvcomp-ans", "zstd-planes"],
        help="the codec (default: the execution device's: nvcomp-ans on CUDA, zstd-planes on the CPU)",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="where to write (default: MODEL_DIR/.vramferry/compressed)")
    p.add_argument(
        "--components", type=_comma_list, metavar="NAMES", help="compress only these components (e.g. transformer)"
    )
    p.add_argument(
        "--rehash",
        action="store_true",
        help="also read the raw bytes of up-to-date pieces and make again those whose digests differ",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_offload_options(p)
    p.set_defaults(handler=cmd_compress)
