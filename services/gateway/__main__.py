"""`python -m services.gateway [flags]`: the OpenAI-compatible HTTP gateway (flags: --help)."""

import sys
from collections.abc import Sequence

from services.gateway.config import GatewayConfig
from services.gateway.server import run
from shared.config import load_config


def main(argv: Sequence[str] | None = None) -> None:
    run(load_config(GatewayConfig, sys.argv[1:] if argv is None else argv, prog="python -m services.gateway"))


if __name__ == "__main__":
    main()
