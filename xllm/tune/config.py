"""The file `xllm tune` writes and `xllm up --config FILE` reads.

One JSON file that is also a cost profile (shared/cost_model.py's format: "samples", "fit" and what was
measured), so the workers seed their step-cost fit from the very steps the tuner measured: `"up"` holds
`xllm up` settings by their UpConfig names (max_num_seqs, max_num_batched_tokens, kv_cache_memory,
kv_host_memory, step_slo_ms, worker_threads, mode) and `cost_profile` defaults to the file itself.
`"tune"` records what was asked, predicted and measured (for people; nothing reads it).
"""

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared.config import env_name
from shared.cost_model import StepSample, fit

FORMAT = 1


def write_config(
    path: str | Path, up: dict[str, Any], samples: list[StepSample], meta: dict[str, Any], tune: dict[str, Any]
) -> None:
    model = fit(samples)
    data = {
        "xllm_tune": FORMAT,
        "up": up,
        "tune": tune,
        **meta,
        "fit": model.to_dict() if model else None,
        "samples": [asdict(s) for s in samples],
    }
    Path(path).write_text(json.dumps(data, indent=1))


def read_up_settings(path: str | Path) -> dict[str, Any]:
    """The `xllm up` settings a tune file holds, cost_profile pointing at the file unless it names another."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"xllm up: --config {path}: {e}") from None
    if not isinstance(data, dict) or data.get("xllm_tune") != FORMAT or not isinstance(data.get("up"), dict):
        raise SystemExit(f"xllm up: --config {path}: not a file `xllm tune` wrote")
    return {"cost_profile": str(Path(path).resolve()), **data["up"]}


def up_defaults(argv: list[str]) -> dict[str, Any]:
    """The settings of the file `--config FILE` (or XLLM_CONFIG) names in `argv`, as `load_config` defaults."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=os.environ.get(env_name("config")) or None)
    path = parser.parse_known_args(argv)[0].config
    return read_up_settings(path) if path else {}
