"""Mixed role: a worker that acts as prefill or as decode, switched by the router while it serves, without a
restart (workload-adaptive PD: services/router/roles.py decides the switches).

It keeps both roles' machinery all the time: the prefill role's KV data server and the decode role's hand-off
subscription. A switch changes only the role it registers under, which is what routers route by: prompts to
split arrive while it acts as prefill; hand-offs and whole requests while it acts as decode. Requests it
already holds run to their end as they started (a prefill still hands off, a decode still decodes), so a
switch neither loses nor re-runs anything.

    xllm.worker.<id>.role   RoleChange -> Ack   (a role it cannot act as: 400)
"""

import structlog
from nats.aio.msg import Msg

from services.decode.worker import DecodeWorker
from services.prefill.worker import PrefillWorker
from services.worker.config import WorkerConfig
from shared import subjects
from shared.bus import respond
from shared.errors import invalid
from shared.messages import Ack, InstanceInfo, RoleChange, SchemaError

log = structlog.get_logger()

ROLES = ("prefill", "decode")


class MixedWorker(PrefillWorker, DecodeWorker):
    role = "mixed"  # its instance id's prefix; it registers as the role it acts as

    def __init__(self, config: WorkerConfig):
        super().__init__(config)
        self.acting = config.initial_role
        self.switches = 0

    async def subscribe_role(self) -> list:
        own = await self.nc.subscribe(subjects.worker_role(self.instance_id), cb=self.on_role)
        return [*await super().subscribe_role(), own]

    def info(self) -> InstanceInfo:
        info = super().info()
        info.role, info.roles = self.acting, list(ROLES)
        return info

    async def on_role(self, msg: Msg) -> None:
        try:
            change = RoleChange.decode(msg.data)
        except SchemaError as e:
            return await respond(msg, Ack("", self.instance_id, False, invalid(str(e)).to_wire()))
        if change.role not in ROLES:
            error = invalid(f"a mixed worker acts as one of {', '.join(ROLES)}, not {change.role!r}", "role")
            return await respond(msg, Ack("", self.instance_id, False, error.to_wire()))
        if change.role != self.acting:
            log.info("role_switched", instance=self.instance_id, role=change.role, was=self.acting)
            self.acting = change.role
            self.switches += 1
            await self._heartbeater.beat()  # routers see the new role now, not at the next heartbeat
        await respond(msg, Ack("", self.instance_id))
