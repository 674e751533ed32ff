"""A worker's prefix-cache events on JetStream, for the kvcache index: numbered per instance, in order, and
never lost to a NATS outage (a gap would cost the index this instance's entries)."""

import asyncio

from nats.js import JetStreamContext

from shared import bus, subjects
from shared.messages import KvEvent
from shared.retry import retry


async def publish_kv_events(js: JetStreamContext, instance_id: str, events: asyncio.Queue) -> None:
    """First "cleared" (a restarted worker holds nothing), then each (event, hashes, parent, tier) the
    engine queues, until cancelled."""
    subject, seq = subjects.kv_events(instance_id), 0

    async def publish(event: KvEvent) -> None:
        nonlocal seq
        seq += 1
        event.seq = seq
        msg_id = f"{instance_id}:{seq}"  # JetStream drops a retry whose first try landed
        await retry(lambda: bus.publish(js, subject, event, msg_id=msg_id), "kv_event_publish")

    await publish(KvEvent(instance_id, 0, "cleared"))
    while True:
        kind, hashes, parent, tier = await events.get()
        await publish(KvEvent(instance_id, 0, kind, hashes, parent, tier))
