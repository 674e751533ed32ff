"""The simulator against the real system: the exact requests of a `benchmarks/adaptive_pd.py` run (when each
was sent, its prompt and output tokens) replayed through `xllm simulate`'s cluster with the same policy, two
instances and the same measured step costs; TTFT and TPOT percentiles side by side.

    PYTHONPATH=. python benchmarks/adaptive_pd.py --cost-profile cost.json --result-dir runs/pd
    PYTHONPATH=. python benchmarks/colocation.py --result-dir runs/col
    PYTHONPATH=. python benchmarks/simulator_check.py --profile cost.json --result-dir runs/pd \
        --alone runs/col/online-alone/online.json

`--alone` adds a run against one colocated worker (benchmarks/colocation.py's "online alone" phase): one
engine on the machine, as the profile measured it. What the simulation leaves out shows up in the others: on
this machine two workers share two cores, so a step slows down whenever the other worker steps too.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from shared.cost_model import CostModel, load_profile
from shared.logging import configure_logging
from xllm.simulate.cluster import ClusterConfig, simulate
from xllm.simulate.trace import TraceRequest

SYSTEMS = {"colocated": "colocated", "split": "split", "adaptive": "adaptive", "adaptive+slo": "adaptive"}


def percentiles(values: list[float]) -> tuple[float, float]:
    return tuple(float(v) * 1000 for v in np.percentile(values, (50, 90)))


def check(name: str, doc: dict, model: CostModel, args: argparse.Namespace, instances: int = 2) -> dict:
    requests = [r for r in doc["runs"][0]["requests"] if r["ok"] and r["output_tokens"] > 1]
    t0 = min(r["start"] for r in requests)
    order = sorted(requests, key=lambda r: r["start"])
    trace = [TraceRequest(r["start"] - t0, r["prompt_tokens"], r["output_tokens"]) for r in order]
    slo = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms} if name == "adaptive+slo" else {}
    config = ClusterConfig(policy=SYSTEMS[name], instances=instances, prefill_share=0.5, **slo)
    sim = [rec for rec in simulate(trace, model, config).records if rec.finish is not None]
    real_tpot = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in order]
    return {
        "real": (percentiles([r["ttft"] for r in order]), percentiles(real_tpot)),
        "sim": (percentiles([r.ttft for r in sim]), percentiles([r.tpot for r in sim])),
        "requests": (len(order), len(sim)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result-dir", help="benchmarks/adaptive_pd.py's JSON files")
    p.add_argument("--alone", help="a run against one colocated worker (colocation.py's online-alone/online.json)")
    p.add_argument("--profile", required=True)
    p.add_argument("--slo-ttft-ms", type=float, default=2000)
    p.add_argument("--slo-tpot-ms", type=float, default=150)
    args = p.parse_args()
    configure_logging("simulator-check", "error")  # the router's per-request lines
    _, meta = load_profile(args.profile)
    model = CostModel.from_dict(meta["fit"])
    print(
        "| system | requests real / sim | TTFT p50 real / sim | TTFT p90 real / sim | TPOT p50 real / sim "
        "| TPOT p90 real / sim |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    runs = [(f"{name} (2 workers)", name, Path(args.result_dir or ".") / f"{name}.json", 2) for name in SYSTEMS]
    if args.alone:
        runs.insert(0, ("colocated (1 worker)", "colocated", Path(args.alone), 1))
    for label, name, path, instances in runs:
        if not path.exists():
            continue
        c = check(name, json.loads(path.read_text()), model, args, instances)
        cells = []
        for metric in (0, 1):
            for pct in (0, 1):
                real, sim = c["real"][metric][pct], c["sim"][metric][pct]
                cells.append(f"{real:.0f} / {sim:.0f} ms ({sim / real - 1:+.0%})")
        print(f"| {label} | {c['requests'][0]} / {c['requests'][1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
