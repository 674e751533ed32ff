"""`python -m services.router --nats nats://host:4222 [flags]`: one router replica (flags: --help)."""

import sys
from collections.abc import Sequence

import uvloop

from services.router.config import RouterConfig
from services.router.service import run
from shared.bus import BusError
from shared.config import load_config


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = load_config(RouterConfig, argv, prog="python -m services.router")
    try:
        uvloop.run(run(config))
    except BusError as e:
        print(f"router: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
