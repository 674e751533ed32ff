"""`python -m services.gateway [flags]`: the OpenAI-compatible HTTP gateway (flags: --help)."""

import sys
from collections.abc import Sequence

from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayService
from shared.service import main as serve_main


def main(argv: Sequence[str] | None = None) -> int:
    return serve_main(GatewayService, GatewayConfig, "python -m services.gateway", argv)


if __name__ == "__main__":
    sys.exit(main())
