"""kvcache service: the global KV block index (which instance holds which prefix blocks, on which tier).

Entry point: `python -m services.kvcache --nats URL`;
in-process: `await serve(KvCacheConfig(...), stop, started)`.
"""

from services.kvcache.service import KvCacheConfig, KvCacheService, run, serve

__all__ = ["KvCacheConfig", "KvCacheService", "run", "serve"]
