"""Bus message schemas: plain dataclasses, msgpack on the wire, with an explicit schema version.

Every message carries `request_id` (or, for per-instance messages, `instance_id`) so one request can
be followed across services. Bulk data (KV blocks, embeddings) never travels here: only handles.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import msgpack

SCHEMA_VERSION = 2  # 2: errors carry the HTTP status as `status` and OpenAI's code as `code`

T = TypeVar("T", bound="Message")


class SchemaError(ValueError):
    """A message that is not msgpack, is of another schema version, or lacks required fields."""


@dataclass
class Message:
    kind: ClassVar[str] = "message"

    def encode(self) -> bytes:
        return msgpack.packb({"v": SCHEMA_VERSION, "kind": self.kind, **asdict(self)}, use_bin_type=True)

    @classmethod
    def decode(cls: type[T], data: bytes) -> T:
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:
            raise SchemaError(f"not a msgpack message: {e}") from e
        if not isinstance(d, dict):
            raise SchemaError("message is not a map")
        if d.get("v") != SCHEMA_VERSION:
            raise SchemaError(f"schema version {d.get('v')!r}, expected {SCHEMA_VERSION}")
        if d.get("kind") != cls.kind:
            raise SchemaError(f"message kind {d.get('kind')!r}, expected {cls.kind!r}")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise SchemaError(f"bad {cls.kind} message: {e}") from e


@dataclass
class GenerateRequest(Message):
    """One tokenized request, gateway -> router -> worker. `params` is SamplingParams.to_dict()."""

    kind: ClassVar[str] = "generate"
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    reply_subject: str  # where the worker publishes StreamChunk messages
    priority: int = 0  # 0 = online; larger = lower priority (offline jobs use 1)
    # Set by the router for prefill->decode disaggregation: the decode instance that continues.
    decode_instance: str | None = None
    attempt: int = 0
    images: list[dict[str, Any]] = field(default_factory=list)  # ImageRef as dicts, in prompt order
    # Set by the gateway on a resubmission: instances an earlier attempt could not reach (a decode worker the
    # prefill could not hand off to), which the registry may still list until their entries lapse.
    avoid: list[str] = field(default_factory=list)


@dataclass
class ImageRef:
    """An image of a prompt: the span of placeholder tokens it fills, its content hash, and its pixels as the
    gateway prepared them (resized and cropped to the model's input size, so bounded: 336x336 RGB is 330 KiB)."""

    offset: int
    length: int
    hash: str
    pixels: bytes  # uint8, row-major [height, width, 3]
    shape: list[int]
    # Set by the router when an encoder computed the image's embeddings: where to read them (EncodedImage).
    embedding: dict[str, Any] | None = None


@dataclass
class EncodeRequest(Message):
    """Router -> encoder: embeddings for these images (ImageRef dicts; offsets unused)."""

    kind: ClassVar[str] = "encode"
    request_id: str
    images: list[dict[str, Any]]


@dataclass
class EncodeReply(Message):
    """Encoder -> router: per image, in order, where its embeddings are (services/encoder/transfer.py:
    {"hash", "name" (shared memory), "host", "port" (TCP), "shape", "dtype"}), or the error."""

    kind: ClassVar[str] = "encode_reply"
    request_id: str
    instance_id: str
    embeddings: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None


@dataclass
class SeqOutput:
    """New output of one of the request's n sequences since the last chunk."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # per new token: [logprob, [[token_id, logprob], ...top]] when logprobs were asked for
    logprobs: list[Any] | None = None


@dataclass
class StreamChunk(Message):
    """Worker -> gateway: incremental output. `finished` is set on the request's last chunk."""

    kind: ClassVar[str] = "chunk"
    request_id: str
    outputs: list[dict[str, Any]] = field(default_factory=list)  # SeqOutput as dicts
    finished: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    instance_id: str = ""
    error: dict[str, Any] | None = None  # shared.errors.ApiError.to_wire(): the request failed
    # Position in the request's stream. NATS keeps order per publisher only, and a disaggregated
    # request has two: the prefill worker sends chunk 0 (the first tokens), the decode worker the rest.
    seq: int = 0


@dataclass
class AbortRequest(Message):
    kind: ClassVar[str] = "abort"
    request_id: str


@dataclass
class InstanceInfo(Message):
    """Registry entry, refreshed by every worker heartbeat (the KV bucket's TTL is liveness)."""

    kind: ClassVar[str] = "instance"
    instance_id: str
    role: str  # "colocated" | "prefill" | "decode" | "encoder"
    model: str
    pid: int
    host: str
    state: str = "ready"  # "starting" | "ready" | "draining"
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 16
    data_plane: dict[str, Any] = field(default_factory=dict)  # how to reach its KV data plane
    # cumulative: prefix_queries, prefix_hits (blocks), preemptions, kv_transfer_bytes, kv_transfer_seconds
    counters: dict[str, float] = field(default_factory=dict)
    updated_at: float = 0.0
    # Step-cost model (shared/cost_model.py: step, seq, token, attention seconds), {} until fitted, and the load
    # it prices: decode_seqs, decode_context_tokens, prefill_tokens, prefill_seconds, max_batched_tokens.
    cost: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    roles: list[str] = field(default_factory=list)  # a mixed worker: the roles it can be switched to ([]: fixed)


@dataclass
class KvEvent(Message):
    """Blocks stored in / removed from one instance's prefix cache, numbered per instance."""

    kind: ClassVar[str] = "kv_event"
    instance_id: str
    seq: int
    event: str  # "stored" | "removed" | "cleared"
    block_hashes: list[int] = field(default_factory=list)
    parent_hash: int | None = None  # for "stored": hash of the block before the first one
    tier: str = "device"


@dataclass
class KvHandoff(Message):
    """Prefill -> decode, as the prefill starts: where the request's prompt KV will be, layer by layer.
    The first tokens and sampler states follow on the data plane (services.worker.kv_transfer)."""

    kind: ClassVar[str] = "kv_handoff"
    request_id: str
    request: dict[str, Any]  # the GenerateRequest as a dict
    handle: dict[str, Any]  # data plane handle (KvExport.handle): segment name, data server, layout
    lease_s: float = 30.0


@dataclass
class JobRequest:
    """One line of a batch job, as in OpenAI's batch API: `body` is a chat or completions request."""

    custom_id: str
    url: str  # "/v1/chat/completions" | "/v1/completions"
    body: dict[str, Any]


@dataclass
class Job(Message):
    """Published to JOBS_SUBMIT. Results go to job_results(job_id), kept in JOB_RESULTS_STREAM."""

    kind: ClassVar[str] = "job"
    job_id: str
    requests: list[dict[str, Any]]  # JobRequest as dicts


@dataclass
class JobResult(Message):
    """One request's outcome: `response` is the OpenAI response body, or `error` says why not."""

    kind: ClassVar[str] = "job_result"
    job_id: str
    custom_id: str
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # ApiError.to_wire()


@dataclass
class JobDone(Message):
    """The last message on a job's results subject."""

    kind: ClassVar[str] = "job_done"
    job_id: str
    completed: int
    failed: int


@dataclass
class KvQuery(Message):
    """Router -> kvcache service: how long a prefix of these tokens does each instance hold?

    `block_size` must be the instances' KV block size (hashes of other block sizes never match).
    """

    kind: ClassVar[str] = "kv_query"
    request_id: str
    token_ids: list[int]
    block_size: int = 16


@dataclass
class KvQueryReply(Message):
    """Per instance, the number of leading full blocks of the query it holds (instances with 0 left out).

    `tiers` breaks each instance's matched blocks down by the fastest tier holding them
    ({"device": n, "host": m}); `num_blocks` is the query's number of full blocks.
    """

    kind: ClassVar[str] = "kv_query_reply"
    request_id: str
    matches: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    num_blocks: int = 0
    error: str | None = None


@dataclass
class Ack(Message):
    """Worker -> router, the reply to a forwarded GenerateRequest: taken (ok) or refused (why)."""

    kind: ClassVar[str] = "ack"
    request_id: str
    instance_id: str
    ok: bool = True
    error: dict[str, Any] | None = None  # ApiError.to_wire(), as in StreamChunk.error


@dataclass
class RoleChange(Message):
    """Router -> mixed worker: act as `role` from now on (answered with an Ack)."""

    kind: ClassVar[str] = "role_change"
    instance_id: str
    role: str


@dataclass
class RouteReply(Message):
    """Router -> gateway (reply to the request on ROUTER_GENERATE): where the request went.

    `instances` lists the workers now holding it (prefill then decode, or the colocated one), so the
    gateway can notice one of them leaving the registry and resubmit. On failure `error` is set.
    """

    kind: ClassVar[str] = "route"
    request_id: str
    instances: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
