"""`python -m services.kvcache [flags]`: one kvcache service replica (flags: --help)."""

import sys
from collections.abc import Sequence

from services.kvcache.config import KvCacheConfig
from services.kvcache.service import KvCacheService
from shared.service import main as serve_main


def main(argv: Sequence[str] | None = None) -> int:
    return serve_main(KvCacheService, KvCacheConfig, "python -m services.kvcache", argv)


if __name__ == "__main__":
    sys.exit(main())
