"""Load test of ``vramferry serve``: many concurrent clients against one server on the demo pipeline.

Starts ``python -m vramferry serve`` on loopback at a free port, runs ``--clients`` concurrent clients that each
send ``--requests`` requests one after another (httpx, asyncio), and checks that:

- every request is answered exactly once, with 200 or 429 (the queue is bounded) and nothing else
  (``--retries N`` resends a request answered 429, after the server's Retry-After scaled by ``--retry-scale``);
- the server's own counters (``/metrics``) agree with what the clients saw;
- every 200 carries a PNG of the asked size, and distinct seeds gave distinct images.

It prints p50/p99 latency and writes everything to a JSON file. Exit code 0 when every check holds.

    python benchmarks/load_server.py --out load_server.json

``--replicas N`` serves N Ray Serve replicas on a local Ray cluster (``serve --replicas N``, the ``ray`` extra):
the counts are then summed over the replicas' labelled metrics, and every replica must have served.

    python benchmarks/load_server.py --replicas 2 --out load_server_replicas.json

Bounded: with the defaults (32 clients x 8 requests, 64x64, 1 step) it takes well under a minute on 2 CPU cores.

``--scenario disconnect-storm``: first ``--waiters`` clients (8) are served alone, one request each, all at once;
then ``--droppers`` clients (32) send a request each and hang up after ``--drop-after`` seconds (0.1), and the
waiters send theirs right behind them. It checks that the waiters are all served within ``--max-slowdown`` (1.5)
times their time alone (the dropped requests leave the queue, and the running one stops at its next step), and
that the server counted every dropped request as 499 (cancelled), none as 200.

The bound means something only when a request takes well over ``--drop-after`` (the droppers ahead in the queue
run until they hang up), hence a larger shape than the load test's:

    python benchmarks/load_server.py --scenario disconnect-storm --size 128x128 --steps 8 --out disconnect_storm.json
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
from collections import Counter
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
    replica: str | None = None  # X-Vramferry-Replica: the Ray Serve replica that answered


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "vramferry", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--offload", args.offload, "--max-queue", str(args.max_queue), "--timeout", str(args.timeout),
    ]  # fmt: skip
    if args.replicas:
        command += ["--replicas", str(args.replicas)]
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
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
    outcome.replica = response.headers.get("x-vramferry-replica")
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


async def storm(base: str, args: argparse.Namespace) -> dict:
    """The waiters alone, then the waiters behind the droppers; what each saw and how long the waiters took."""
    timeout = httpx.Timeout(args.timeout + 30)
    limits = httpx.Limits(max_connections=args.waiters + args.droppers)

    async def wave(client: httpx.AsyncClient, first_seed: int) -> tuple[float, list[Outcome]]:
        start = time.perf_counter()
        outcomes = await asyncio.gather(
            *(one_request(client, i, first_seed + i, args) for i in range(args.waiters))
        )
        return time.perf_counter() - start, list(outcomes)

    async def drop(client: httpx.AsyncClient, index: int, seed: int) -> Outcome:
        body = {
            "prompt": f"dropped {seed}",
            "size": args.size,
            "num_inference_steps": args.steps,
            "seed": seed,
        }
        start = time.perf_counter()
        try:
            response = await client.post("/v1/images/generations", json=body)
        except httpx.ReadTimeout:  # hanging up closes the connection, as a closed browser tab does
            return Outcome(index, seed, 0, time.perf_counter() - start, error="dropped")
        return Outcome(index, seed, response.status_code, time.perf_counter() - start)

    # A client each, made before the clock starts (making one costs milliseconds of this process's CPU).
    dropping = [
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30, read=args.drop_after))
        for _ in range(args.droppers)
    ]
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        await one_request(client, -1, 10**6, args)  # warm-up, not counted in the times
        before = server_counts(base)
        alone, alone_outcomes = await wave(client, 0)
        droppers = [asyncio.create_task(drop(c, i, 1000 + i)) for i, c in enumerate(dropping)]
        await asyncio.sleep(0.01)  # the droppers are queued first: the waiters wait behind them
        stormed, storm_outcomes = await wave(client, 100)
        dropped = list(await asyncio.gather(*droppers))
        await asyncio.sleep(0.5)  # the server counts a drop when it notices it
        after = server_counts(base)
    for c in dropping:
        await c.aclose()
    delta = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    return {
        "waiters_alone_s": round(alone, 3),
        "waiters_in_storm_s": round(stormed, 3),
        "slowdown": round(stormed / alone, 3),
        "alone": alone_outcomes,
        "storm": storm_outcomes,
        "dropped": dropped,
        "server_counts_delta": {k: v for k, v in delta.items() if v},
    }


def check_storm(result: dict, args: argparse.Namespace) -> list[str]:
    """Every failed check of the disconnect storm, in words."""
    problems = []
    waiters = result["alone"] + result["storm"]
    problems += [f"waiter seed {o.seed}: status {o.status}: {o.error}" for o in waiters if o.status != 200][
        :5
    ]
    if result["slowdown"] > args.max_slowdown:
        problems.append(
            f"the waiters took {result['waiters_in_storm_s']} s in the storm, {result['slowdown']}x their "
            f"{result['waiters_alone_s']} s alone (limit {args.max_slowdown}x)"
        )
    dropped = sum(o.error == "dropped" for o in result["dropped"])
    answered_ok = sum(o.status == 200 for o in result["dropped"])
    counts = result["server_counts_delta"]
    if dropped == 0:
        problems.append("no client dropped (the requests were answered within --drop-after)")
    if counts.get("499", 0) != dropped:
        problems.append(f"{dropped} clients dropped, the server counted {counts.get('499', 0):g} as 499")
    if counts.get("200", 0) != 2 * args.waiters + answered_ok:
        problems.append(
            f"the server counted {counts.get('200', 0):g} answers 200, for "
            f"{2 * args.waiters + answered_ok} given (dropped requests must not count as 200)"
        )
    return problems


def main_storm(args: argparse.Namespace, base: str) -> tuple[dict, list[str]]:
    result = asyncio.run(storm(base, args))
    summary = {
        key: result[key]
        for key in ("waiters_alone_s", "waiters_in_storm_s", "slowdown", "server_counts_delta")
    }
    summary["dropped"] = sum(o.error == "dropped" for o in result["dropped"])
    summary["droppers_answered"] = {
        str(status): sum(o.status == status for o in result["dropped"])
        for status in sorted({o.status for o in result["dropped"] if o.status})
    }
    report = {
        "summary": summary,
        "problems": check_storm(result, args),
        "outcomes": {key: [asdict(o) for o in result[key]] for key in ("alone", "storm", "dropped")},
    }
    return report, report["problems"]


def server_counts(base: str) -> dict[str, float]:
    """Requests answered by status, summed over the replicas (one server has none)."""
    return {status: sum(by_replica.values()) for status, by_replica in replica_counts(base).items()}


def settled_counts(base: str, answers: int, timeout: float = 10.0) -> dict[str, float]:
    """The server's counts once they add up to ``answers`` (Ray Serve replicas share theirs every 0.5 s)."""
    deadline = time.monotonic() + timeout
    counts = server_counts(base)
    while sum(counts.values()) < answers and time.monotonic() < deadline:
        time.sleep(0.25)
        counts = server_counts(base)
    return counts


def replica_counts(base: str) -> dict[str, dict[str, float]]:
    """status -> replica ("" for a single server) -> requests answered."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counts: dict[str, dict[str, float]] = {}
    for labels, value in _REQUESTS.findall(text):
        found = dict(_LABEL.findall(labels))
        counts.setdefault(found["status"], {})[found.get("replica", "")] = float(value)
    return counts


_REQUESTS = re.compile(r"^vramferry_requests_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


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


def main_load(args: argparse.Namespace, base: str) -> tuple[dict, list[str]]:
    start = time.perf_counter()
    outcomes = asyncio.run(run_clients(base, args))
    wall = time.perf_counter() - start
    counts = settled_counts(base, len(outcomes) + sum(o.attempts - 1 for o in outcomes))
    problems = check(outcomes, counts, args)
    served = dict(Counter(o.replica for o in outcomes if o.status == 200 and o.replica))
    if args.replicas and len(served) < args.replicas:
        problems.append(f"{args.replicas} replicas, but only these served: {served}")
    report = {
        "summary": {**summarise(outcomes, wall), **({"served_by_replica": served} if args.replicas else {})},
        "server_counts": counts,
        "problems": problems,
        "outcomes": [asdict(o) for o in outcomes],
    }
    return report, problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("load", "disconnect-storm"), default="load")
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
    parser.add_argument("--waiters", type=int, default=8, help="disconnect-storm: clients that wait")
    parser.add_argument("--droppers", type=int, default=32, help="disconnect-storm: clients that hang up")
    parser.add_argument(
        "--drop-after", type=float, default=0.1, help="disconnect-storm: seconds before hanging up"
    )
    parser.add_argument(
        "--max-slowdown", type=float, default=1.5, help="disconnect-storm: waiters' time in the storm / alone"
    )
    parser.add_argument(
        "--replicas", type=int, default=0, help="serve --replicas N: Ray Serve replicas on a local cluster"
    )
    parser.add_argument(
        "--max-batch", type=int, help="the server's --max-batch (default: the server's; 1: no batching)"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--out", default="load_server.json", help="where the JSON report goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scenario == "disconnect-storm":
        # Room in the queue for everyone: a 429 is not a disconnect.
        args.max_queue = max(args.max_queue, args.waiters + args.droppers)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="vramferry-serve-", suffix=".log")[1])
    server = start_server(port, args, log)
    try:
        wait_until_healthy(base, server, args.startup_timeout)
        if args.scenario == "disconnect-storm":
            report, problems = main_storm(args, base)
        else:
            report, problems = main_load(args, base)
    except Exception:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        server.terminate()  # SIGTERM: a Ray cluster that serve started is shut down with it
        server.wait(timeout=120)
    command = "python benchmarks/load_server.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "settings": vars(args), **report}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    if "server_counts" in report:
        print(f"server counted: {report['server_counts']}")
    print("checks: " + ("all passed" if not problems else "FAILED\n  " + "\n  ".join(problems)))
    if problems:
        print(f"wrote {args.out} (server log: {log})")
        return 1
    log.unlink()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
