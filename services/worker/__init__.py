"""What every engine worker role shares (colocated, prefill, decode).

worker.py        the worker on the bus: requests from the router, StreamChunks to the gateway, aborts,
                 registry heartbeats, prefix-cache events; `run_worker` is every role's entry point
async_engine.py  the engine on its own thread, for the event loop
kv_transfer.py   the prefill -> decode KV data plane (export, data server, import)
shm.py           its shared-memory segments
"""
