"""`python -m services.kvcache --nats nats://host:4222` runs one kvcache service replica."""

import sys

import uvloop

from services.kvcache.service import KvCacheConfig, run
from shared.bus import BusError


def main(argv: list[str] | None = None) -> int:
    config = KvCacheConfig.from_args(argv)
    try:
        uvloop.run(run(config))
    except BusError as e:
        print(f"kvcache: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
