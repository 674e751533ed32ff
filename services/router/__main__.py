"""`python -m services.router --nats nats://host:4222 [flags]`: one router replica (flags: --help)."""

import sys
from collections.abc import Sequence

from services.router.config import RouterConfig
from services.router.service import RouterService
from shared.service import main as serve_main


def main(argv: Sequence[str] | None = None) -> int:
    return serve_main(RouterService, RouterConfig, "python -m services.router", argv)


if __name__ == "__main__":
    sys.exit(main())
