"""`python -m services.prefill [flags]`: one prefill worker (flags: --help)."""

import sys
from collections.abc import Sequence

from services.prefill.worker import PrefillWorker
from services.worker.worker import run_worker


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker(PrefillWorker, argv, prog="python -m services.prefill")


if __name__ == "__main__":
    sys.exit(main())
