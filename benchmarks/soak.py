"""Soak: mixed online traffic and offline jobs against a local `xllm up` for N minutes, to show leaks.

    nice -n 19 python benchmarks/soak.py [--minutes 10] [--mode disaggregated|colocated] [--concurrency 6]
        [--seed 0] [--state-dir DIR] [--up-args "--kv-cache-fraction 0.02 --worker-threads 1 --max-num-seqs 32"]

Starts its own system on 127.0.0.1 (stopped at the end, on Ctrl-C and on errors). `--concurrency` clients
each pick, seeded: a short chat, a long streamed /v1/completions with ignore_eos, a streamed chat, an n=2/3
sampled chat, or a long stream closed after a few events (a drop, intended). Every response is checked
(status, OpenAI body / events, no error event, usage). Meanwhile a 20-request batch job runs on JetStream,
a new one whenever the last is done. Prints, at the start and the end, KV blocks in use per worker (read
when idle) and the RSS of every process of the system; at the end also requests served per kind, errors by
kind, jobs, failovers, tokens, RSS growth and a verdict. Exit 0 if no request failed and no KV block
leaked, else 1. The state dir is kept: its logs/*.log tell what went wrong.
"""

import argparse
import asyncio
import json
import random
import shlex
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors
from soak_checks import BadResponse, check_chat, check_stream, check_usage  # beside this script

from shared import subjects
from shared.bus import connect
from shared.jobs import iter_results, make_job
from shared.messages import JobDone, JobRequest
from xllm.bench.local_system import System, start_system, stop_system
from xllm.bench.processes import memory_line, rss_mib
from xllm.bench.words import WORDS

MODEL = "smollm2"
UP_ARGS = "--kv-cache-fraction 0.02 --worker-threads 1 --max-num-seqs 32"
KINDS = ("short_chat", "long_stream", "stream_chat", "n_choices", "drop")
REQUEST_TIMEOUT_S = 300.0
JOB_SIZE = 20
JOB_GRACE_S = 180.0  # how long past the end the job in flight may take
SETTLE_S = 60.0  # the most to wait for an idle system before reading its KV blocks


@dataclass
class Stats:
    served: Counter = field(default_factory=Counter)  # by request kind; "drop" = closed mid-stream on purpose
    errors: Counter = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)  # the first errors, in full
    tokens: Counter = field(default_factory=Counter)  # prompt, completion
    jobs_done: int = 0
    job_failed: int = 0

    def error(self, kind: str, what: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{time.strftime('%H:%M:%S')} {what}: {kind}: {detail[:300]}")

    def ok(self, kind: str, tokens: tuple[int, int]) -> None:
        self.served[kind] += 1
        self.tokens.update(prompt=tokens[0], completion=tokens[1])


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def chat_body(rng: random.Random, max_tokens: int, **extra: Any) -> dict[str, Any]:
    content = f"{words(rng, 8, 64)}. Say something about that."
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


async def call(s: aiohttp.ClientSession, url: str, body: dict, stop_after: int = 0) -> Any:
    """The JSON body, or a stream's JSON events up to [DONE]; `stop_after` N events: close the connection."""
    async with s.post(f"{url}/v1/{'chat/' if 'messages' in body else ''}completions", json=body) as r:
        if r.status != 200:
            raise BadResponse(f"http_{r.status}", (await r.text())[:300])
        if not body.get("stream"):
            try:
                return json.loads(await r.text())
            except ValueError as e:
                raise BadResponse("bad_body", repr(e)) from None
        events: list[dict] = []
        async for raw in r.content:
            if not (line := raw.decode().strip()).startswith("data:"):
                continue
            if (payload := line[5:].strip()) == "[DONE]":
                return events
            try:
                events.append(event := json.loads(payload))
            except ValueError:
                raise BadResponse("bad_body", payload[:300]) from None
            if "error" in event:
                raise BadResponse("stream_error", json.dumps(event["error"])[:300])
            if stop_after and len(events) >= stop_after:
                r.close()  # the client goes away mid-stream
                return events
    raise BadResponse("bad_body", f"stream ended without [DONE] after {len(events)} events")


async def one_request(s: aiohttp.ClientSession, url: str, kind: str, rng: random.Random) -> tuple[int, int]:
    if kind in ("short_chat", "n_choices"):
        n, mt = (1 if kind == "short_chat" else rng.choice((2, 3))), rng.randint(8, 32)
        extra = {} if n == 1 else {"n": n, "temperature": 0.8, "seed": rng.randrange(1 << 31)}
        return check_chat(await call(s, url, chat_body(rng, mt, **extra)), n, mt)
    if kind == "stream_chat":
        mt = rng.randint(16, 128)
        events = await call(s, url, chat_body(rng, mt, stream=True, stream_options={"include_usage": True}))
        return check_stream(events, mt, False)
    mt = rng.randint(200, 600)
    body = {
        "model": MODEL,
        "prompt": words(rng, 16, 128),
        "max_tokens": mt,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == "drop":
        await call(s, url, body, stop_after=rng.randint(2, 6))
        return 0, 0
    return check_stream(await call(s, url, body), mt, True)


async def client(s: aiohttp.ClientSession, url: str, rng: random.Random, end: float, stats: Stats) -> None:
    while time.monotonic() < end:
        kind = rng.choice(KINDS)
        try:
            stats.ok(kind, await one_request(s, url, kind, rng))
        except BadResponse as e:
            stats.error(e.kind, kind, e.detail)
        except TimeoutError as e:
            stats.error("timeout", kind, repr(e))
        except aiohttp.ClientError as e:
            stats.error("connection", kind, repr(e))
        except (AttributeError, TypeError, KeyError, IndexError) as e:  # a body of an unexpected shape
            stats.error("bad_body", kind, repr(e))


async def jobs(nats_url: str, rng: random.Random, end: float, stats: Stats) -> None:
    nc = await connect(nats_url, "xllm-soak")
    try:
        while time.monotonic() < end:
            try:
                await one_job(nc.jetstream(), rng, stats, end + JOB_GRACE_S)
            except (nats.errors.Error, TimeoutError) as e:
                stats.error("job_timeout" if isinstance(e, TimeoutError) else "job_nats", "job", repr(e))
                await asyncio.sleep(1.0)
    finally:
        await nc.close()


async def one_job(js: Any, rng: random.Random, stats: Stats, until: float) -> None:
    """Publishes a job as tests/integration/test_serving.py does, then checks every result."""
    want = {f"r{i}": rng.randint(8, 24) for i in range(JOB_SIZE)}
    job = make_job(
        [
            JobRequest(cid, "/v1/chat/completions", chat_body(rng, mt, ignore_eos=True, temperature=0))
            for cid, mt in want.items()
        ]
    )
    await js.publish(subjects.JOBS_SUBMIT, job.encode(), timeout=10, headers={"Nats-Msg-Id": job.job_id})
    seen: set[str] = set()
    async for item in iter_results(js, job.job_id, timeout=max(1.0, until - time.monotonic())):
        if isinstance(item, JobDone):
            stats.jobs_done += 1
            if len(seen) != JOB_SIZE:
                stats.error("job_missing", f"job {job.job_id}", f"{len(seen)} results, {item}")
        elif item.custom_id not in seen:  # a redelivered job may repeat a result
            seen.add(item.custom_id)
            try:
                if item.error is not None:
                    raise BadResponse(f"http_{item.error.get('status')}", json.dumps(item.error))
                stats.ok("job_request", check_usage((item.response or {}).get("usage"), want[item.custom_id], True))
            except BadResponse as e:
                stats.job_failed += 1
                stats.error(f"job_{e.kind}", f"job {job.job_id}:{item.custom_id}", e.detail)


async def soak(system: System, args: argparse.Namespace) -> Stats:
    stats, start = Stats(), time.monotonic()
    end = start + args.minutes * 60
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as s:
        tasks = [client(s, system.url, random.Random(f"{args.seed}-{i}"), end, stats) for i in range(args.concurrency)]
        work = asyncio.gather(*tasks, jobs(system.nats_url, random.Random(f"{args.seed}-jobs"), end, stats))
        while not work.done():
            await asyncio.wait([work], timeout=30)
            print(
                f"  {time.monotonic() - start:5.0f} s: served {sum(stats.served.values())}, errors "
                f"{sum(stats.errors.values())}, jobs done {stats.jobs_done}; {memory_line(system.proc.pid)}",
                flush=True,
            )
        await work
    return stats


def kv_in_use(system: System) -> tuple[dict[str, int], bool]:
    """-> (KV blocks in use per instance, idle reached): read once every instance is idle and the numbers
    held for 3 heartbeats. free_blocks is BlockManager.num_free_blocks: never-used blocks plus ref-0 blocks
    the prefix cache keeps (evictable). So cached blocks count as free, an idle worker should show 0 in use,
    and anything more is held for a sequence that is gone: a leak."""
    prev, stable, deadline = None, 0, time.monotonic() + SETTLE_S
    while True:
        loads = {i["instance_id"]: i["load"] for i in system.instances()}
        used = {inst: load["total_blocks"] - load["free_blocks"] for inst, load in loads.items()}
        idle = all(load["running"] == 0 and load["waiting"] == 0 for load in loads.values())
        stable = stable + 1 if idle and used == prev else 0
        if stable >= 3 or time.monotonic() > deadline:
            return used, stable >= 3
        prev = used
        time.sleep(1.0)


def show_state(title: str, used: dict[str, int], idle: bool, rss: dict[int, tuple[str, float]]) -> None:
    print(f"== {title}{'' if idle else f' (NOT idle after {SETTLE_S:g} s)'}")
    for inst, n in sorted(used.items()):
        print(f"  KV blocks in use  {inst}: {n}")
    for pid, (name, mib) in sorted(rss.items()):
        print(f"  RSS  {name:<36} pid {pid:<8} {mib:8.1f} MiB")


def report(system: System, stats: Stats, duration: float, before: tuple, after: tuple) -> bool:
    (used0, _, rss0), (used1, _, rss1) = before, after
    failovers = sum('"event": "failover"' in line for line in system.log("gateway").splitlines())
    print(f"== summary after {duration:.0f} s of traffic")
    served = {kind: n for kind, n in sorted(stats.served.items()) if kind != "drop"}
    print(f"  served: {served}, dropped (on purpose) {stats.served['drop']}")
    print(f"  jobs done {stats.jobs_done}, job requests failed {stats.job_failed}, failovers {failovers}")
    print(f"  tokens: {stats.tokens['prompt']} prompt, {stats.tokens['completion']} completion")
    print(f"  errors: {dict(stats.errors) or 'none'}", *(f"\n    {line}" for line in stats.samples), sep="")
    for pid, (name, mib) in sorted(rss1.items()):
        if pid in rss0:
            d = mib - rss0[pid][1]
            print(f"  RSS growth  {name:<36} {d:+8.1f} MiB {100 * d / max(rss0[pid][1], 1e-9):+7.1f}%")
    if rss0.keys() != rss1.keys():
        print(
            f"  processes gone: {[f'{rss0[p][0]} pid {p}' for p in rss0.keys() - rss1.keys()]}, "
            f"new: {[f'{rss1[p][0]} pid {p}' for p in rss1.keys() - rss0.keys()]}"
        )
    leaks = {i: used1.get(i, 0) - used0.get(i, 0) for i in sorted(used0.keys() | used1.keys())}
    failed, leaked = sum(stats.errors.values()), sum(max(0, n) for n in leaks.values())
    print(
        f"verdict: {'PASS' if failed == leaked == 0 else 'FAIL'}: failed requests {failed}, "
        f"leaked blocks {leaked} {leaks}"
    )
    return failed == leaked == 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--mode", choices=("disaggregated", "colocated"), default="disaggregated")
    p.add_argument("--concurrency", type=int, default=6, help="client loops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", help="for `xllm up` (default: a new temp dir)")
    p.add_argument("--up-args", default=UP_ARGS, help=f"more flags for `xllm up` (default: {UP_ARGS!r})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the system too
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="xllm-soak-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    print(f"== starting xllm up --mode {args.mode} {args.up_args} (state dir {state_dir})", flush=True)
    system = start_system(state_dir, "--mode", args.mode, *shlex.split(args.up_args))
    try:
        before = (*kv_in_use(system), rss_mib(system.proc.pid))
        show_state(f"start: {system.url}", *before)
        print(f"== traffic for {args.minutes:g} min, {args.concurrency} clients, seed {args.seed}", flush=True)
        t0 = time.monotonic()
        stats = asyncio.run(soak(system, args))
        duration = time.monotonic() - t0
        after = (*kv_in_use(system), rss_mib(system.proc.pid))
        show_state("end", *after)
        ok = report(system, stats, duration, before, after)
    finally:
        stop_system(system.proc)
    print(f"logs: {state_dir}/logs/")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
