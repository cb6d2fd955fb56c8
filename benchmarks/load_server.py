"""Load test of ``vramferry serve``: many concurrent clients against one server on the demo pipeline.

Starts ``python -m vramferry serve`` on loopback at a free port, runs ``--clients`` concurrent clients that each
send ``--requests`` requests one after another (httpx, asyncio), and checks that:

- every request is answered exactly once, with 200 or 429 (the queue is bounded) and nothing else
  (``--retries N`` resends a request answered 429, after the server's Retry-After scaled by ``--retry-scale``);
- the server's own counters (``/metrics``) agree with what the clients saw;
- every 200 carries a PNG of the asked size, and distinct seeds gave distinct images.

It prints p50/p99 latency and writes everything to a JSON file. Exit code 0 when every check holds.

    python benchmarks/load_server.py --out load_server.json

Bounded: with the defaults (32 clients x 8 requests, 64x64, 1 step) it takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from PIL import Image


@dataclass
class Outcome:
    client: int
    seed: int
    status: int
    seconds: float
    digest: str | None = None
    size: tuple[int, int] | None = None
    error: str | None = None
    attempts: int = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "vramferry", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--offload", args.offload, "--max-queue", str(args.max_queue), "--timeout", str(args.timeout),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    handle = log.open("w")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


def wait_until_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy within {timeout:.0f} s")


async def one_request(client: httpx.AsyncClient, index: int, seed: int, args: argparse.Namespace) -> Outcome:
    body = {"prompt": f"load test {seed}", "size": args.size, "num_inference_steps": args.steps, "seed": seed}
    start = time.perf_counter()
    attempts = 0
    while True:
        attempts += 1
        try:
            response = await client.post("/v1/images/generations", json=body)
        except httpx.HTTPError as exc:
            return Outcome(index, seed, 0, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
        if response.status_code != 429 or attempts > args.retries:
            break
        # Honour the server's Retry-After, scaled down: the demo answers in milliseconds.
        await asyncio.sleep(float(response.headers.get("retry-after", "1")) * args.retry_scale)
    outcome = Outcome(index, seed, response.status_code, time.perf_counter() - start, attempts=attempts)
    if response.status_code == 200:
        data = response.json()["data"]
        png = base64.b64decode(data[0]["b64_json"])
        outcome.digest = hashlib.sha256(Image.open(io.BytesIO(png)).tobytes()).hexdigest()
        outcome.size = Image.open(io.BytesIO(png)).size
    elif response.status_code != 429:
        outcome.error = response.text[:300]
    return outcome


async def run_clients(base: str, args: argparse.Namespace) -> list[Outcome]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.timeout + 30)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:

        async def one_client(index: int) -> list[Outcome]:
            seeds = range(index * args.requests, (index + 1) * args.requests)
            return [await one_request(client, index, seed, args) for seed in seeds]

        per_client = await asyncio.gather(*(one_client(i) for i in range(args.clients)))
    return [outcome for outcomes in per_client for outcome in outcomes]


def server_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    pattern = re.compile(r'^vramferry_requests_total\{status="(\d+)"\} ([0-9.e+]+)$', re.MULTILINE)
    return {status: float(value) for status, value in pattern.findall(text)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def check(outcomes: list[Outcome], counts: dict[str, float], args: argparse.Namespace) -> list[str]:
    """Every failed check, in words."""
    problems = []
    expected = args.clients * args.requests
    if len(outcomes) != expected or len({o.seed for o in outcomes}) != expected:
        problems.append(f"{len(outcomes)} answers for {expected} requests")
    bad = [o for o in outcomes if o.status not in (200, 429)]
    problems += [f"seed {o.seed}: status {o.status}: {o.error}" for o in bad[:5]]
    ok = [o for o in outcomes if o.status == 200]
    if not ok:
        problems.append("no request succeeded")
    width, height = (int(side) for side in args.size.split("x"))
    problems += [f"seed {o.seed}: image size {o.size}" for o in ok if o.size != (width, height)][:5]
    if len({o.digest for o in ok}) != len(ok):
        problems.append(f"{len(ok)} images but only {len({o.digest for o in ok})} distinct ones")
    for status in sorted({str(o.status) for o in outcomes if o.status}):
        seen = sum(str(o.status) == status for o in outcomes)
        if counts.get(status, 0) != seen:
            problems.append(
                f"status {status}: clients saw {seen}, the server counted {counts.get(status, 0):g}"
            )
    return problems


def summarise(outcomes: list[Outcome], wall: float) -> dict:
    latencies = [o.seconds for o in outcomes]
    ok = [o.seconds for o in outcomes if o.status == 200]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "rejected_429": sum(o.status == 429 for o in outcomes),
        "retries": sum(o.attempts - 1 for o in outcomes),
        "other": sum(o.status not in (200, 429) for o in outcomes),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(len(ok) / wall, 3) if wall else None,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ok_latency_p50_s": percentile(ok, 50),
        "ok_latency_p99_s": percentile(ok, 99),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per client, sent one after another")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0, help="the server's per-request timeout")
    parser.add_argument("--offload", default="none", help="the server's --offload")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--retries", type=int, default=0, help="resend a request answered 429 up to N times")
    parser.add_argument(
        "--retry-scale", type=float, default=0.05, help="wait Retry-After x this before resending"
    )
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--out", default="load_server.json", help="where the JSON report goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="vramferry-serve-", suffix=".log")[1])
    server = start_server(port, args, log)
    try:
        wait_until_healthy(base, server, args.startup_timeout)
        start = time.perf_counter()
        outcomes = asyncio.run(run_clients(base, args))
        wall = time.perf_counter() - start
        counts = server_counts(base)
    except Exception:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(timeout=30)
    problems = check(outcomes, counts, args)
    report = {
        "command": "python benchmarks/load_server.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "summary": summarise(outcomes, wall),
        "server_counts": counts,
        "problems": problems,
        "outcomes": [asdict(o) for o in outcomes],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"server counted: {counts}")
    print("checks: " + ("all passed" if not problems else "FAILED\n  " + "\n  ".join(problems)))
    if problems:
        print(f"wrote {args.out} (server log: {log})")
        return 1
    log.unlink()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
