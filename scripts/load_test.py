#!/usr/bin/env python
"""A bounded load test of `vlsearch serve`, on loopback only. It stops by itself.

Phases (each limited by its request count and by --max-seconds):

  fast       --clients concurrent clients, --requests requests: text searches, image searches and
             deliberately invalid requests (empty/huge/binary/non-UTF-8 queries, bad k, non-images...)
  rerank     the same clients, --rerank-requests text searches re-ranked by the Slow model
             (skipped when the server has no re-ranker)
  overload   --overload-clients clients (past capacity) firing --overload-requests valid searches:
             the service should shed the excess at once with 503 + Retry-After
  slow       --slow-clients sockets held open (half idle, half sending their request a byte at a time)
             while --clients clients run --slow-requests valid searches: their p50 must stay under 3x
             the same searches' p50 without them (the server's header deadline closes the sockets)
  recovery   --clients clients again, --recovery-requests valid searches: all must succeed

For each phase it reports throughput, p50/p90/p99 latency of successful requests, intended 4xx,
unexpected statuses, 503s (shed), other 5xx, and lost requests (connection failures, timeouts).
Exit status 0 when there were no 5xx outside the overload phase, no lost requests and nothing
unexpected; 1 otherwise; 2 for bad arguments.

    .venv/bin/python scripts/load_test.py                     # starts `vlsearch serve` on the default index
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

QUERIES = [
    "a dog jumps over a fence",
    "children playing in the water",
    "a man riding a bicycle on a dirt road",
    "a snowy mountain with skiers",
    "two dogs running through the grass",
    "a girl in a pink dress",
    "a group of people standing on a beach",
    "a black dog carrying a stick",
    "a boy jumping into a swimming pool",
    "a climber on a rock wall",
    "a man in a red shirt sits on a bench",
    "a brown dog plays with a ball in the snow",
    "people walking down a city street at night",
    "a surfer riding a wave",
    "a woman with a camera",
    "a little kid on a swing",
    "a motorcyclist racing on a track",
    "football players in a game",
    "a white dog runs along the shore",
    "a child in a yellow jacket",
]


@dataclass
class Spec:
    kind: str  # text | image | rerank | invalid
    method: str
    path: str
    expect: str  # "ok" or "4xx"
    files: dict | None = None
    content: bytes | None = None
    headers: dict | None = None


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: lost
    ms: float
    retry_after: bool = False
    error: str = ""  # "" = as expected, "intended" = an intended 4xx, else what went wrong
    expect: str = "ok"


@dataclass
class Phase:
    name: str
    clients: int
    outcomes: list = field(default_factory=list)
    seconds: float = 0.0
    planned: int = 0
    stopped_early: bool = False


def invalid_specs(sample_image: bytes | None) -> list[Spec]:
    s = [
        Spec("invalid", "GET", "/search?q=", "4xx"),
        Spec("invalid", "GET", "/search?q=%20%20%20", "4xx"),
        Spec("invalid", "GET", "/search?q=" + "x" * 10_000, "4xx"),
        Spec("invalid", "GET", "/search?q=%FF%FE%00", "4xx"),
        Spec("invalid", "GET", "/search?q=caf%E9", "4xx"),  # Latin-1, not UTF-8
        Spec("invalid", "GET", "/search?q=a%00b", "4xx"),
        Spec("invalid", "GET", "/search?q=dog&k=0", "4xx"),
        Spec("invalid", "GET", "/search?q=dog&k=-5", "4xx"),
        Spec("invalid", "GET", "/search?q=dog&k=1000000000000", "4xx"),
        Spec("invalid", "GET", "/search?q=dog&k=lots", "4xx"),
        Spec("invalid", "GET", "/search?k=3", "4xx"),
        Spec("invalid", "GET", "/search?q=dog&rerank=x", "4xx"),
        Spec("invalid", "GET", "/images/..%2F..%2Fetc%2Fpasswd", "4xx"),
        Spec("invalid", "POST", "/search/image", "4xx", files={"file": ("a.txt", b"not an image")}),
        Spec("invalid", "POST", "/search/image", "4xx", files={"file": ("r.bin", os.urandom(2048))}),
        Spec("invalid", "POST", "/images", "4xx", files={"files": ("a.jpg", b"x")}),
    ]
    if sample_image:
        s.append(
            Spec(
                "invalid",
                "POST",
                "/search/image",
                "4xx",
                files={"file": ("t.jpg", sample_image[: len(sample_image) // 4])},
            )
        )
    return s


def text_spec(rng: random.Random, rerank: int = 0) -> Spec:
    q = rng.choice(QUERIES)
    if rng.random() < 0.5:  # vary the text so nothing could be served from a cache
        q = f"{q} {rng.choice(['outside', 'today', 'in summer', 'close up', 'at the park'])}"
    k = rng.choice([5, 10, 24])
    path = f"/search?q={quote(q)}&k={k}"
    if rerank:
        path += f"&rerank={rerank}&explain={rng.choice([0, 1])}"
    return Spec("rerank" if rerank else "text", "GET", path, "ok")


def image_spec(rng: random.Random, images: list[bytes]) -> Spec:
    data = rng.choice(images)
    return Spec(
        "image", "POST", f"/search/image?k={rng.choice([5, 10])}", "ok", files={"file": ("q.jpg", data)}
    )


def plan(n: int, rng: random.Random, images: list[bytes], invalid_share: float, image_share: float) -> list:
    bad = invalid_specs(images[0] if images else None)
    out = []
    for _ in range(n):
        x = rng.random()
        if x < invalid_share:
            out.append(rng.choice(bad))
        elif x < invalid_share + image_share and images:
            out.append(image_spec(rng, images))
        else:
            out.append(text_spec(rng))
    return out


async def slow_sockets(base: str, n: int, stop: asyncio.Event, report: dict) -> None:
    """Hold ``n`` connections: even ones idle, odd ones dripping a request line one byte every 0.5 s.
    ``report``: how many opened, and how many the server closed on its own."""
    host, port = urlsplit(base).hostname, urlsplit(base).port or 80
    line = b"GET /search?q=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    conns = []
    for i in range(n):
        try:
            conns.append((i, *await asyncio.open_connection(host, port)))
        except OSError:
            report["refused"] = report.get("refused", 0) + 1
    report["opened"] = len(conns)
    closed: set[int] = set()
    step = 0
    while not stop.is_set():
        for i, reader, writer in conns:
            if i in closed:
                continue
            if reader.at_eof() or writer.is_closing():
                closed.add(i)
                continue
            if i % 2:
                try:
                    writer.write(line[step % len(line) : step % len(line) + 1])
                except (ConnectionError, OSError):
                    closed.add(i)
        step += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass
    for i, reader, writer in conns:
        if not reader.at_eof() and not writer.is_closing():
            try:
                await asyncio.wait_for(reader.read(1), 0.001)
            except (TimeoutError, ConnectionError, OSError):
                pass
        if reader.at_eof():
            closed.add(i)
        writer.close()
    report["closed_by_server"] = len(closed)


async def run_with_slow_sockets(base, phase, specs, max_seconds, timeout, n_sockets) -> tuple[Phase, dict]:
    stop, report = asyncio.Event(), {}
    holder = asyncio.create_task(slow_sockets(base, n_sockets, stop, report))
    while "opened" not in report and not holder.done():
        await asyncio.sleep(0.05)
    try:
        phase = await run_phase(base, phase, specs, max_seconds, timeout)
    finally:
        stop.set()
        await holder
    return phase, report


async def run_phase(base: str, phase: Phase, specs: list[Spec], max_seconds: float, timeout: float) -> Phase:
    queue: asyncio.Queue = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    phase.planned = len(specs)
    t0 = time.perf_counter()

    async def client():
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as c:
            while True:
                if time.perf_counter() - t0 > max_seconds:
                    phase.stopped_early = not queue.empty()
                    return
                try:
                    spec = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                start = time.perf_counter()
                try:
                    r = await c.request(
                        spec.method, spec.path, files=spec.files, content=spec.content, headers=spec.headers
                    )
                    await r.aread()
                    out = Outcome(
                        spec.kind, r.status_code, 0.0, "retry-after" in r.headers, expect=spec.expect
                    )
                    if spec.expect == "ok" and r.status_code == 200:
                        out.error = ""
                    elif spec.expect == "4xx" and 400 <= r.status_code < 500:
                        out.error = "intended"
                    else:
                        out.error = f"{spec.method} {spec.path[:60]} -> {r.status_code} {r.text[:120]}"
                except httpx.HTTPError as e:
                    out = Outcome(spec.kind, None, 0.0, error=f"{type(e).__name__}: {e}", expect=spec.expect)
                out.ms = (time.perf_counter() - start) * 1e3
                phase.outcomes.append(out)

    await asyncio.gather(*(client() for _ in range(phase.clients)))
    phase.seconds = time.perf_counter() - t0
    return phase


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))], 1)


def summarize(phase: Phase) -> dict:
    o = phase.outcomes
    ok = [x for x in o if x.status == 200 and x.expect == "ok"]
    intended = [x for x in o if x.error == "intended"]
    shed = [x for x in o if x.status == 503]
    server_errors = [x for x in o if x.status is not None and x.status >= 500 and x.status != 503]
    lost = [x for x in o if x.status is None]
    unexpected = [x for x in o if x.status is not None and x.status < 500 and x.error not in ("", "intended")]
    by_kind = {}
    for kind in sorted({x.kind for x in ok}):
        lat = [x.ms for x in ok if x.kind == kind]
        by_kind[kind] = {"n": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99)}
    lat = [x.ms for x in ok]
    return {
        "phase": phase.name,
        "clients": phase.clients,
        "requests": len(o),
        "planned": phase.planned,
        "stopped_early": phase.stopped_early,
        "seconds": round(phase.seconds, 2),
        "throughput_rps": round(len(o) / phase.seconds, 1) if phase.seconds else None,
        "ok": len(ok),
        "intended_4xx": len(intended),
        "unexpected": len(unexpected),
        "shed": len(shed),
        "shed_without_retry_after": sum(not x.retry_after for x in shed),
        "server_errors": len(server_errors),
        "lost": len(lost),
        "latency_ms": {
            "p50": pct(lat, 50),
            "p90": pct(lat, 90),
            "p99": pct(lat, 99),
            "max": pct(lat, 100),
        },
        "latency_by_kind_ms": by_kind,
        "shed_latency_ms": {"p50": pct([x.ms for x in shed], 50), "p99": pct([x.ms for x in shed], 99)},
        "examples": [x.error for x in (server_errors + lost + unexpected)[:5]],
    }


def check_loopback(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_STREAM)}
        loopback = bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
    except (OSError, ValueError):
        loopback = False
    if parts.scheme != "http" or not loopback:
        print(
            f"load_test: refusing {url}: only http:// on a loopback address (127.0.0.1, ::1)", file=sys.stderr
        )
        sys.exit(2)
    return url.rstrip("/")


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("vlsearch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vlsearch.cli"]
    cmd += ["serve", "--port", str(port), "--log-level", "warning"]
    if args.index:
        cmd += ["--index", args.index]
    cmd += args.serve_args
    print("load_test: starting " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            print(f"load_test: the server exited with {proc.returncode}", file=sys.stderr)
            sys.exit(2)
        try:
            httpx.get(url + "/healthz", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    print("load_test: the server did not start within 180 s", file=sys.stderr)
    sys.exit(2)


def sample_images(url: str, n: int = 4) -> list[bytes]:
    """A few images of the index itself, as query images."""
    r = httpx.get(url + "/search", params={"q": "a photo", "k": n}, timeout=60)
    r.raise_for_status()
    return [httpx.get(url + h["url"], timeout=60).content for h in r.json()["results"]]


def fmt_table(rows: list[dict]) -> str:
    head = (
        "| phase | clients | requests | req/s | p50 ms | p99 ms | ok | intended 4xx | 503 shed | "
        "5xx | lost | unexpected |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['phase']} | {r['clients']} | {r['requests']} | {r['throughput_rps']} | "
        f"{r['latency_ms']['p50']} | {r['latency_ms']['p99']} | {r['ok']} | {r['intended_4xx']} | "
        f"{r['shed']} | {r['server_errors']} | {r['lost']} | {r['unexpected']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (loopback only); default: start one")
    p.add_argument("--index", default=None, help="index for the server this script starts")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rerank-requests", type=int, default=200)
    p.add_argument("--rerank-k", type=int, default=30, help="Fast candidates re-ranked per request")
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-requests", type=int, default=1000)
    p.add_argument("--recovery-requests", type=int, default=200)
    p.add_argument("--slow-clients", type=int, default=2000, help="slow sockets held open in the slow phase")
    p.add_argument("--slow-requests", type=int, default=200, help="valid searches during the slow phase")
    p.add_argument("--invalid-share", type=float, default=0.25)
    p.add_argument("--image-share", type=float, default=0.05)
    p.add_argument("--max-seconds", type=float, default=120, help="time limit per phase")
    p.add_argument("--timeout", type=float, default=30, help="per request; longer counts as lost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON ('-' = stdout)")
    p.add_argument("serve_args", nargs="*", help="extra `vlsearch serve` arguments (after --)")
    args = p.parse_args(argv)
    if min(args.clients, args.overload_clients) < 1 or args.requests < 0 or args.max_seconds <= 0:
        p.error("clients must be >= 1, requests >= 0, max-seconds > 0")
    proc = None
    if args.url:
        url = check_loopback(args.url)
    else:
        proc, url = start_server(args)
    log = sys.stderr if args.json == "-" else sys.stdout
    try:
        health = httpx.get(url + "/healthz", timeout=30).json()
        images = sample_images(url)
        rng = random.Random(args.seed)
        phases = []

        def run(name, clients, specs):
            print(f"load_test: {name}: {len(specs)} requests, {clients} clients ...", file=log, flush=True)
            ph = asyncio.run(run_phase(url, Phase(name, clients), specs, args.max_seconds, args.timeout))
            phases.append(summarize(ph))

        run(
            "fast",
            args.clients,
            plan(args.requests, rng, images, args.invalid_share, args.image_share),
        )
        if args.rerank_requests and health["rerank"]["enabled"]:
            run("rerank", args.clients, [text_spec(rng, args.rerank_k) for _ in range(args.rerank_requests)])
        elif args.rerank_requests:
            print(f"load_test: rerank: skipped ({health['rerank']['note']})", file=log)
        if args.overload_requests:
            specs = [
                text_spec(rng, args.rerank_k if health["rerank"]["enabled"] and i % 4 == 0 else 0)
                if i % 10
                else image_spec(rng, images)
                for i in range(args.overload_requests)
            ]
            run("overload", args.overload_clients, specs)
        if args.slow_clients and args.slow_requests:
            specs = [text_spec(rng) for _ in range(args.slow_requests)]
            run("slow-baseline", args.clients, specs)
            print(
                f"load_test: slow: {len(specs)} requests, {args.clients} clients, "
                f"{args.slow_clients} slow sockets ...",
                file=log,
                flush=True,
            )
            ph, sockets = asyncio.run(
                run_with_slow_sockets(
                    url, Phase("slow", args.clients), specs, args.max_seconds, args.timeout, args.slow_clients
                )
            )
            row = summarize(ph)
            row["slow_sockets"] = sockets
            base_p50 = phases[-1]["latency_ms"]["p50"]
            row["p50_vs_without"] = (
                round(row["latency_ms"]["p50"] / base_p50, 2)
                if base_p50 and row["latency_ms"]["p50"]
                else None
            )
            phases.append(row)
        if args.recovery_requests:
            run("recovery", args.clients, [text_spec(rng) for _ in range(args.recovery_requests)])
        after = httpx.get(url + "/healthz", timeout=30).json()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    report = {
        "url": url,
        "server": {
            "n_images": health["index"]["n_images"],
            "rerank": health["rerank"]["enabled"],
            "workers": health["load"]["workers"],
            "capacity": health["load"]["capacity"],
        },
        "server_load_after": after["load"],
        "phases": phases,
    }
    failed = [
        ph["phase"]
        for ph in phases
        if ph["lost"]
        or ph["unexpected"]
        or ph["server_errors"]
        or ph["shed_without_retry_after"]
        or (ph["shed"] and ph["phase"] != "overload")
        or (ph["phase"] == "slow" and (ph["p50_vs_without"] is None or ph["p50_vs_without"] >= 3))
    ]
    report["passed"] = not failed
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(fmt_table(phases))
        for ph in phases:
            kinds = ", ".join(
                f"{k} p50 {v['p50']} / p99 {v['p99']} ms" for k, v in ph["latency_by_kind_ms"].items()
            )
            extra = f"; 503 answered in p50 {ph['shed_latency_ms']['p50']} ms" if ph["shed"] else ""
            print(
                f"{ph['phase']}: {kinds}{extra}"
                + ("; STOPPED EARLY (time limit)" if ph["stopped_early"] else "")
            )
            if ph["phase"] == "slow":
                so = ph["slow_sockets"]
                print(
                    f"   {so.get('opened', 0)} slow sockets held ({so.get('closed_by_server', 0)} closed by the "
                    f"server); search p50 {ph['p50_vs_without']}x its value without them (limit 3x)"
                )
            for ex in ph["examples"]:
                print(f"   {ex}")
        print(
            f"server after the run: {after['load']['in_flight']} in flight, {after['load']['shed']} shed in total, "
            f"peak {after['load']['peak_in_flight']} of capacity {after['load']['capacity']}"
        )
        print("PASSED: no 5xx outside overload, no lost requests" if not failed else f"FAILED in: {failed}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
