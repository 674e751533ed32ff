"""The `cluster` fixture: fake workers and a router over a real nats-server (tests/router/fakes.py)."""

import uuid
from collections.abc import AsyncIterator

import pytest

from shared.instance_view import InstanceView
from tests.router.fakes import TTL, Cluster


@pytest.fixture
async def cluster(nc) -> AsyncIterator[Cluster]:
    view = await InstanceView.open(nc, bucket=f"rt_{uuid.uuid4().hex[:10]}", ttl=TTL)
    c = Cluster(nc, view)
    try:
        yield c
    finally:
        await c.close()
        await view.close()
        await nc.jetstream().delete_key_value(view.registry.bucket)
