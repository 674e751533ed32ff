"""`python -m services.colocated [flags]`: one colocated worker (flags: --help)."""

import sys
from collections.abc import Sequence

from services.worker.worker import Worker, run_worker


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker(Worker, argv, prog="python -m services.colocated")


if __name__ == "__main__":
    sys.exit(main())
