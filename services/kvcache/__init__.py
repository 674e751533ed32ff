"""kvcache service: the global KV block index (which instance holds which prefix blocks, on which tier).

  index.py    the index itself, no I/O: KV events in, longest cached prefix per instance out
  service.py  the service on the bus: replays and follows the events, answers queries
Entry point: `python -m services.kvcache --nats URL`.
"""
