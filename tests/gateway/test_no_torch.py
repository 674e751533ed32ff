"""The gateway never loads torch: it reads the model's tokenizer and config through shared/model_files.py."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gateway_imports_no_torch_module() -> None:
    # -X importtime writes one stderr line per module imported: "import time: self | cumulative | name"
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "services.gateway", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    imported = [line.rpartition("|")[2].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert "services.gateway.server" in imported and "shared.model_files" in imported  # the whole service
    assert [name for name in imported if "torch" in name] == []
