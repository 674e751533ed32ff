"""Online traffic with and without a saturating offline job on the same worker, side by side in one run.

    PYTHONPATH=. python benchmarks/colocation.py [--num-prompts 40] [--rate 1] [--job-requests 120]

One `xllm up --mode colocated` worker (two torch threads) with the default model. Each phase sends the same
seeded online workload with `xllm bench serve` (chat, Poisson arrivals, EOS ignored) and reads TTFT, TPOT and
SLO attainment:
  online alone      nothing else runs
  with offline job  an offline job (`xllm bench serve --workload offline`: one JetStream job) is submitted
                    first and keeps the worker busy throughout
  job, unmetered    the same, with offline sequences let into online steps freely (XLLM_OFFLINE_SLOWDOWN:
                    online arrivals still take offline sequences' places; only the step-time cap is off)
For the job it reports the requests done while the online phase ran and the job's whole time.
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from xllm.bench.local_system import REPO, bench_serve, bench_serve_argv, start_system, stop_system

PHASES = {"online alone": None, "with offline job": "0.1", "job, unmetered": "1000"}


def online(url: str, args: argparse.Namespace, out: Path, name: str) -> tuple[dict, float, float]:
    """The online run's summary, and when it started and ended (time.time())."""
    started = time.time()
    summary = bench_serve(
        url,
        out,
        name,
        *("--input-len", "128", "--output-len", "64", "--ignore-eos", "--seed", str(args.seed)),
        *("--request-rate", str(args.rate), "--num-prompts", str(args.num_prompts), "--warmup", "1"),
        *("--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}"),
    )
    return summary, started, time.time()


def wait_busy(system, timeout: float = 60.0) -> None:
    """Until the worker runs job requests (the job has reached it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(i["load"]["running"] >= 4 for i in system.instances()):
            return
        time.sleep(0.2)
    raise RuntimeError("the offline job never reached the worker")


def run_phase(name: str, slowdown: str | None, args: argparse.Namespace, root: Path) -> dict:
    state = root / name.replace(" ", "-").replace(",", "")
    state.mkdir(parents=True, exist_ok=True)
    env = {"XLLM_OFFLINE_SLOWDOWN": slowdown} if slowdown is not None else {}  # xllm up's workers read XLLM_<FLAG>
    system = start_system(state, "--mode", "colocated", "--decode", "1", "--worker-threads", "2", env=env)
    job = None
    try:
        warmup = ("--num-prompts", "8", "--input-len", "64", "--output-len", "16", "--ignore-eos")
        bench_serve(system.url, state, "warmup", *warmup)  # the worker fits its cost model
        if slowdown is not None:
            job_argv = bench_serve_argv(
                system.url,
                state,
                "job",
                *("--workload", "offline", "--nats", system.nats_url, "--num-prompts", str(args.job_requests)),
                *("--input-len", "256", "--output-len", "128", "--ignore-eos", "--seed", "7", "--warmup", "0"),
            )
            job_started = time.time()
            job = subprocess.Popen(job_argv, cwd=REPO, stdout=subprocess.DEVNULL)
            wait_busy(system)
        summary, t0, t1 = online(system.url, args, state, "online")
        if job is not None:
            job.wait(timeout=args.job_timeout)
            doc = json.loads((state / "job.json").read_text())
            e2e = [r["e2e"] for r in doc["runs"][0]["requests"] if r["ok"]]
            summary["job"] = {
                "done": len(e2e),
                "during_online": sum(1 for e in e2e if t0 <= job_started + e <= t1),
                "online_s": t1 - t0,
                "job_s": doc["runs"][0]["summary"]["duration_s"],
            }
        return summary
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        stop_system(system.proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--job-requests", type=int, default=120)
    p.add_argument("--job-timeout", type=float, default=1200)
    p.add_argument("--slo-ttft-ms", type=float, default=1000)
    p.add_argument("--slo-tpot-ms", type=float, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", help="keep the `xllm bench serve` JSON files here (for simulator_check.py)")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="colocation-") as tmp:
        root = Path(args.result_dir or tmp)
        for name, slowdown in PHASES.items():
            results[name] = run_phase(name, slowdown, args, root)
            print(f"{name}: attainment {results[name]['goodput']['attainment']:.0%}", flush=True)
    print(
        f"\nonline: {args.num_prompts} requests, 128/64 tokens, Poisson {args.rate} req/s; SLO TTFT "
        f"{args.slo_ttft_ms:.0f} ms, TPOT {args.slo_tpot_ms:.0f} ms; job: {args.job_requests} requests, 256/128\n"
    )
    print(
        "| phase | online attainment | TTFT p50 / p90 ms | TPOT p50 / p90 ms | job requests done during online "
        "/ online s | job s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        ttft, tpot, job = s["ttft_ms"], s["tpot_ms"], s.get("job")
        during = f"{job['during_online']} / {job['online_s']:.0f}" if job else "-"
        job_s = f"{job['job_s']:.0f}" if job else "-"
        print(
            f"| {name} | {s['goodput']['attainment']:.0%} | {ttft['p50']:.0f} / {ttft['p90']:.0f} "
            f"| {tpot['p50']:.0f} / {tpot['p90']:.0f} | {during} | {job_s} |"
        )


if __name__ == "__main__":
    main()
