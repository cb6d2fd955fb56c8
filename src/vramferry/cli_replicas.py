"""``vramferry serve --replicas N``: the server as Ray Serve replicas (:mod:`vramferry.server.ray`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_options import (
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    _positive_int,
    check_port,
    offload_config,
    require_extra,
)


def _replica_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {value}")
    return value


def add_replica_options(parser: argparse.ArgumentParser) -> None:
    """``--replicas``, ``--ray-address``, ``--min-replicas``, ``--max-replicas`` (any of them: Ray Serve)."""
    group = parser.add_argument_group("replicas (Ray Serve; needs the 'ray' extra)")
    group.add_argument(
        "--replicas",
        type=_positive_int,
        metavar="N",
        help="serve N replicas behind one endpoint, one GPU each (CPU replicas where there is no GPU)",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this running Ray cluster ('auto': the one this node is part of, or HEAD:6379) instead of "
        "starting a local one",
    )
    group.add_argument(
        "--min-replicas",
        type=_replica_count,
        metavar="N",
        help="autoscale between --min-replicas and --max-replicas (default: --replicas, else 1)",
    )
    group.add_argument(
        "--max-replicas",
        type=_positive_int,
        metavar="N",
        help="the most replicas when autoscaling (default: the larger of --replicas and --min-replicas)",
    )


def replicated(args: argparse.Namespace) -> bool:
    """Whether the command line asks for Ray Serve replicas."""
    names = ("replicas", "ray_address", "min_replicas", "max_replicas")
    return any(getattr(args, name, None) is not None for name in names)


def note_unprotected(host: str, settings: Any) -> None:
    """A note on stderr when the server listens beyond this machine without an API key (both ``serve`` paths)."""
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"note: listening on {host} without an API key (--api-key)", file=sys.stderr)


def serve_replicas(args: argparse.Namespace, settings: Any) -> int:
    """Deploy the server as replicas and serve until SIGTERM or Ctrl-C (a local cluster is shut down then)."""
    low, high = args.min_replicas, args.max_replicas
    if low is not None and high is not None and low > high:
        raise UsageError(f"--min-replicas {low} is above --max-replicas {high}")
    if args.replicas is not None and not (low or 0) <= args.replicas <= (high or args.replicas):
        raise UsageError(f"--replicas {args.replicas} is outside --min-replicas/--max-replicas")
    require_extra("serve --replicas", "ray", ("ray.serve",))
    from .server import ray as ray_server

    application = ray_server.deployment(
        model=args.model,
        config=offload_config(args),  # not fitted here: each replica fits it to its own machine
        settings=settings,
        dtype=args.dtype,
        lora=args.lora or (),
        sizes=args.sizes or (),
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
    )
    if args.ray_address is None:
        check_port(args.host, args.port)  # the local cluster's proxy listens here
    note_unprotected(args.host, settings)
    try:
        ray_server.run(application, host=args.host, port=args.port, address=args.ray_address)
    except ray_server.DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
