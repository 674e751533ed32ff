"""`python -m services.kvcache [flags]`: one kvcache service replica (flags: --help)."""

import sys
from collections.abc import Sequence

from services.kvcache.service import KvCacheConfig, run
from shared.bus import BusError


def main(argv: Sequence[str] | None = None) -> int:
    config = KvCacheConfig.from_args(sys.argv[1:] if argv is None else argv)
    try:
        run(config)
    except BusError as e:  # NATS unreachable: say so in one line, not a traceback
        print(f"kvcache: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
