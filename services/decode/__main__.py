"""`python -m services.decode [flags]`: one decode worker (flags: --help)."""

import sys
from collections.abc import Sequence

from services.decode.worker import DecodeWorker
from services.worker.worker import run_worker


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker(DecodeWorker, argv, prog="python -m services.decode")


if __name__ == "__main__":
    sys.exit(main())
