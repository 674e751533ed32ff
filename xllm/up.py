"""`xllm up`: one command that starts the whole system on this machine.

An embedded nats-server (JetStream on, data under the state dir) unless `--nats` names one, then the
kvcache service, the router, the workers and the gateway, each its own OS process running the same
`python -m services.<name>` command that compose and Kubernetes run. A process that dies is
restarted (and the restart logged); the embedded NATS on the same port with the same JetStream store,
so services reconnect to it and nothing in its streams (offline jobs, KV events) is lost. Ctrl-C /
SIGTERM stops everything, gateway first so in-flight requests finish, and leaves no process behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.router.epd import ENCODE_MODES
from shared.config import opt
from shared.engine.config import (
    DRAFT_LENGTHS,
    QUANTIZATION_HELP,
    QUANTIZATIONS,
    SPECULATIVE_METHODS,
    speculation_problem,
)
from shared.logging import LOG_LEVELS
from shared.model_files import takes_images
from xllm.natsd import NatsServer, NatsServerError

log = structlog.get_logger()


@dataclass
class UpConfig:
    """Start NATS (unless given), kvcache, router, workers and the gateway as local processes."""

    host: str = opt("127.0.0.1", "gateway address")
    port: int = opt(8000, "gateway HTTP port", min=0, max=65535)
    model: str = opt("smollm2", "GGUF file, Hugging Face folder, or a known short name")
    mode: str = opt(
        "disaggregated",
        "disaggregated (prefill -> decode), mixed (the same, each worker switched between prefill and decode by the "
        "router as the load asks: needs --slo-ttft-ms / --slo-tpot-ms), or colocated",
        choices=("disaggregated", "mixed", "colocated"),
    )
    router_mode: str = opt(
        "auto",
        "disaggregated mode: per request, prefill -> decode or whole on a decode worker, by predicted cost (auto), "
        "or always prefill -> decode (disaggregated)",
        choices=("auto", "disaggregated"),
    )
    slo_ttft_ms: float | None = opt(None, "time-to-first-token target (router paths and admission; gateway)", min=1)
    slo_tpot_ms: float | None = opt(None, "time-per-output-token target (the same)", min=0.1)
    cost_profile: str | None = opt(None, "step costs `xllm profile` saved, for every worker's first predictions")
    prefill: int = opt(1, "prefill workers (disaggregated mode; mixed: how many start as prefill)", min=1)
    decode: int = opt(1, "decode workers (disaggregated) or colocated workers", min=1)
    encoder: int = opt(0, "multimodal encoder services (EPD: images encoded apart from the prefill)", min=0)
    encode: str = opt(
        "auto",
        "where images are encoded: per request by measured cost (auto), encoder (always), worker (never)",
        choices=ENCODE_MODES,
    )
    nats: str | None = opt(None, "use this NATS instead of starting one")
    state_dir: str = opt("./state", "where the embedded NATS keeps its JetStream data, and logs go")
    api_key: str | None = opt(None, "require this bearer token on /v1/*")
    worker_threads: int | None = opt(
        None, "torch threads per worker (default: all cores, see docs/performance.md)", min=1
    )
    quantization: str = opt("auto", QUANTIZATION_HELP, choices=QUANTIZATIONS)
    kv_cache_fraction: float = opt(0.1, "fraction of free memory for each worker's KV cache", min=0.001, max=0.9)
    max_num_seqs: int = opt(64, "sequences a worker runs at once", min=1)
    max_num_batched_tokens: int | None = opt(None, "tokens a worker's engine step computes at most", min=16)
    step_slo_ms: float | None = opt(
        None,
        "decode and colocated workers fit each step's token budget to this TPOT target by their measured step costs",
        min=0.1,
    )
    config: str | None = opt(
        None, "a file `xllm tune` wrote: its settings become the defaults (a flag or XLLM_* variable still wins)"
    )
    kv_cache_memory: int | None = opt(None, "bytes of each worker's KV cache (instead of --kv-cache-fraction)", min=1)
    kv_host_memory: int | None = opt(None, "bytes of each worker's second KV tier (evicted prefix blocks)", min=1)
    speculative: str = opt("none", "speculative decoding on decode and colocated workers", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = opt(5, "the most draft tokens a sequence scores per step", min=1, max=32)
    draft_length: str = opt(
        "adaptive", "adaptive (a cost model decides) or fixed (all that is proposed)", choices=DRAFT_LENGTHS
    )
    draft_model: str | None = opt(None, "with --speculative draft: a smaller model with the same tokenizer")
    expert_parallel: int = opt(1, "processes each worker splits a MoE model's experts over", min=1)
    num_redundant_experts: int = opt(0, "extra expert slots per MoE layer, for copies of hot experts", min=0)
    enable_eplb: bool = opt(False, "rebalance experts while serving (with --expert-parallel)")
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)
    ready_timeout_s: float = opt(300.0, "seconds to wait for /health and every worker before giving up", min=1)

    def validate(self) -> None:
        problem = speculation_problem(self.speculative, self.draft_model)
        if problem:
            raise ValueError(problem)
        if self.mode == "mixed" and self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            raise ValueError(
                "--mode mixed switches workers between roles to meet SLO targets: give --slo-ttft-ms "
                "and/or --slo-tpot-ms"
            )
        if self.encoder and not takes_images(self.model):
            raise ValueError(f"--encoder needs a model that takes images (a LLaVA folder); {self.model!r} does not")


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    restarts: int = 0


def plan(config: UpConfig, nats_url: str) -> list[Service]:
    """The processes to run, in start order (the gateway last: it is the one users reach)."""
    py = [sys.executable, "-m"]
    common = flags(nats=nats_url, log_level=config.log_level)
    roles = ["prefill"] * config.prefill + ["decode"] * config.decode
    router_mode = config.router_mode
    initial = [flags(initial_role=role) if config.mode == "mixed" else [] for role in roles]
    if config.mode == "mixed":
        roles = ["mixed"] * len(roles)
    if config.mode == "colocated":
        roles, router_mode = ["colocated"] * config.decode, "auto"
    # Every worker may use every core: on 2 cores, 2 threads per worker beat 1 each for prefill +
    # decode, bursty and steady alike (prefill and decode phases rarely peak together).
    threads = config.worker_threads or (os.cpu_count() or 1)
    worker_args = flags(
        model=config.model,
        num_threads=threads,
        quantization=config.quantization,
        kv_cache_fraction=config.kv_cache_fraction,
        max_num_seqs=config.max_num_seqs,
        expert_parallel=config.expert_parallel,
        num_redundant_experts=config.num_redundant_experts,
    )
    if config.enable_eplb:
        worker_args.append("--enable-eplb")
    slo = flags(**given(slo_ttft_ms=config.slo_ttft_ms, slo_tpot_ms=config.slo_tpot_ms))
    worker_args += flags(
        **given(
            cost_profile=config.cost_profile,
            kv_cache_memory=config.kv_cache_memory,
            kv_host_memory=config.kv_host_memory,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
    )
    step_slo = flags(**given(step_slo_ms=config.step_slo_ms))  # not for prefill workers: they run no decodes
    speculation = flags(
        speculative=config.speculative,
        num_speculative_tokens=config.num_speculative_tokens,
        draft_length=config.draft_length,
        **given(draft_model=config.draft_model),
    )
    services = [
        Service("kvcache", [*py, "services.kvcache", *common]),
        Service("router", [*py, "services.router", *common, *flags(encode=config.encode, mode=router_mode), *slo]),
    ]
    for i in range(config.encoder):
        own = flags(model=config.model, num_threads=threads, instance_id=f"encoder-{i}-{os.getpid()}")
        services.append(Service(f"encoder-{i}", [*py, "services.encoder", *common, *own]))
    for i, role in enumerate(roles):
        name = f"{role}-{i}"
        own = (
            flags(instance_id=f"{name}-{os.getpid()}")
            + initial[i]
            + (speculation + step_slo if role != "prefill" else [])
        )
        services.append(Service(name, [*py, f"services.{role}", *common, *worker_args, *own]))
    gateway = flags(model=config.model, host=config.host, port=config.port)
    env = {"XLLM_API_KEY": config.api_key} if config.api_key else {}  # not on the command line
    services.append(Service("gateway", [*py, "services.gateway", *common, *gateway, *slo], env))
    return services


def given(**values: object) -> dict[str, object]:
    """The keyword arguments that are not None."""
    return {name: value for name, value in values.items() if value is not None}


def flags(**values: object) -> list[str]:
    """Command-line flags from keyword arguments: flags(max_num_seqs=8) == ["--max-num-seqs", "8"]."""
    return [arg for name, value in values.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


class Supervisor:
    def __init__(self, services: list[Service], log_dir: Path, nats: NatsServer | None = None):
        self.services = services
        self.log_dir = log_dir
        self.nats = nats  # the embedded server, if this launcher started one
        self.stopping = False

    def start(self, service: Service) -> None:
        logfile = open(self.log_dir / f"{service.name}.log", "ab")  # noqa: SIM115 -- owned by the child
        service.proc = subprocess.Popen(
            service.argv,
            env={**os.environ, **service.env},
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logfile.close()

    def check(self) -> None:
        """Restart whatever exited while we are not stopping: NATS first, every service needs it."""
        if self.nats is not None and not self.nats.running and not self.stopping:
            log.warning("nats_exited_restarting", url=self.nats.url, log=str(self.nats.log_path))
            try:
                self.nats.restart()
                log.info("nats_restarted", url=self.nats.url)
            except NatsServerError as e:  # say, the port is taken meanwhile: try again at the next check
                log.error("nats_restart_failed", error=str(e))
        for s in self.services:
            if s.proc and s.proc.poll() is not None and not self.stopping:
                s.restarts += 1
                log.warning(
                    "service_exited_restarting",
                    service=s.name,
                    code=s.proc.returncode,
                    restarts=s.restarts,
                    log=str(self.log_dir / f"{s.name}.log"),
                )
                time.sleep(min(5.0, 0.5 * s.restarts))
                self.start(s)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping = True
        for group in (["gateway"], None):  # gateway first: it lets in-flight requests finish
            targets = [s for s in self.services if s.proc and (group is None or s.name in group)]
            for s in targets:
                if s.proc.poll() is None:
                    s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for s in targets:
                try:
                    s.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("service_killed", service=s.name)
                    os.killpg(s.proc.pid, signal.SIGKILL)
                    s.proc.wait()


def wait_ready(url: str, supervisor: Supervisor, workers: int, timeout: float, api_key: str | None = None) -> bool:
    """True once /health is 200 and every worker started has registered (so "up" means all of it)."""
    deadline = time.monotonic() + timeout
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        supervisor.check()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                healthy = r.status == 200
            if healthy:
                admin = urllib.request.Request(f"{url}/admin/instances", headers=auth)
                with urllib.request.urlopen(admin, timeout=2) as r:
                    if len(json.loads(r.read())) >= workers:
                        return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def up(config: UpConfig) -> int:
    state = Path(config.state_dir).resolve()
    log_dir = state / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    nats = None
    stop = {"now": False}

    def on_signal(*_) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if config.nats is None:
        nats = NatsServer(state)
        nats_url = nats.start()
        log.info("nats_started", url=nats_url, data=str(state / "nats"))
    else:
        nats_url = config.nats
    supervisor = Supervisor(plan(config, nats_url), log_dir, nats)
    try:
        for service in supervisor.services:
            supervisor.start(service)
        url = f"http://{config.host}:{config.port}"
        workers = config.encoder + (config.decode if config.mode == "colocated" else config.prefill + config.decode)
        if not wait_ready(url, supervisor, workers, config.ready_timeout_s, config.api_key) and not stop["now"]:
            log.error("not_healthy_in_time", url=url, logs=str(log_dir))
            return 1
        if not stop["now"]:
            print(f"xllm is up: {url}  (OpenAI API at {url}/v1; NATS at {nats_url}; logs in {log_dir})", flush=True)
        while not stop["now"]:
            supervisor.check()
            time.sleep(0.5)
        log.info("stopping")
        return 0
    finally:
        supervisor.stop()
        if nats:
            nats.stop()
