"""Every NATS subject, stream and bucket name, defined once.

Request plane (core NATS):
  xllm.router.generate            gateway -> router (queue group "router"); router forwards to a worker
  xllm.worker.<instance>.generate router -> one worker (colocated, or prefill in disaggregated mode)
  xllm.worker.<instance>.kv       prefill -> decode: KV hand-off handle for one request
  xllm.abort                      gateway -> every worker (broadcast): abort one request by id
  <gateway inbox>.<request_id>    worker -> gateway: the request's output chunks (its reply_subject)
  xllm.kvcache.query              router -> kvcache service: longest cached prefix per instance
  xllm.encoder.<instance>.encode  router -> one encoder: image embeddings (EncodeRequest -> EncodeReply)
Control plane:
  KV bucket  xllm_instances       instance registry, one key per instance, per-key TTL = liveness
  JetStream  XLLM_KV_EVENTS       subjects xllm.kv.events.<instance>: block stored / removed events
Offline jobs (JetStream):
  XLLM_JOBS        subject xllm.jobs.submit           a batch job (list of OpenAI-style requests)
  XLLM_JOB_RESULTS subjects xllm.jobs.results.<job_id> one message per request result, then a summary
"""

ROUTER_GENERATE = "xllm.router.generate"
ABORT = "xllm.abort"
ROUTER_QUEUE = "router"
KVCACHE_QUERY = "xllm.kvcache.query"
KVCACHE_QUEUE = "kvcache"

INSTANCES_BUCKET = "xllm_instances"

KV_EVENTS_STREAM = "XLLM_KV_EVENTS"
KV_EVENTS_PREFIX = "xllm.kv.events"

JOBS_STREAM = "XLLM_JOBS"
JOBS_SUBMIT = "xllm.jobs.submit"
JOB_RESULTS_STREAM = "XLLM_JOB_RESULTS"
JOB_RESULTS_PREFIX = "xllm.jobs.results"


def worker_generate(instance_id: str) -> str:
    return f"xllm.worker.{instance_id}.generate"


def worker_kv(instance_id: str) -> str:
    return f"xllm.worker.{instance_id}.kv"


def worker_role(instance_id: str) -> str:
    """A mixed worker's role switch (RoleChange -> Ack)."""
    return f"xllm.worker.{instance_id}.role"


def encoder_encode(instance_id: str) -> str:
    return f"xllm.encoder.{instance_id}.encode"


def kv_events(instance_id: str) -> str:
    return f"{KV_EVENTS_PREFIX}.{instance_id}"


def job_results(job_id: str) -> str:
    return f"{JOB_RESULTS_PREFIX}.{job_id}"
