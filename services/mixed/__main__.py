"""`python -m services.mixed [flags]`: one mixed worker, prefill or decode as the router says (flags: --help)."""

import sys
from collections.abc import Sequence

from services.mixed.worker import MixedWorker
from services.worker.worker import run_worker


def main(argv: Sequence[str] | None = None) -> int:
    return run_worker(MixedWorker, argv, prog="python -m services.mixed")


if __name__ == "__main__":
    sys.exit(main())
