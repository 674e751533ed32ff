"""Colocated role: one engine does the prefill and the decode of a request, and streams it to the gateway.

The baseline disaggregation must beat, and the right choice for small deployments. It is the plain
worker (services/worker/worker.py): nothing to hand off.
"""
