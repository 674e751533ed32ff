"""Expert parallelism: the experts of every MoE layer split over N processes joined by torch.distributed
(gloo on the CPU).

Rank 0 is the engine: scheduler, attention, router, sampling, the KV cache, and its own share of the
experts. Ranks 1..N-1 hold only their share of the experts and serve them (`python -m
shared.engine.expert_parallel`). At each MoE layer rank 0 broadcasts the layer's tokens and their slots,
every rank computes its experts' part, and a reduce sums the parts on rank 0. Attention stays on rank 0:
with one engine per group there is no second batch to run it on, and the KV cache, prefix cache and
hand-offs stay exactly as without expert parallelism (docs/architecture.md).
"""

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.engine.eplb import ExpertCost, Placement, default_placement
from shared.engine.loader import load_checkpoint
from shared.engine.moe import EXPERT_TENSOR, Experts, SparseMoeBlock, checkpoint_name

STOP, RUN_EXPERTS, MOVE_EXPERTS = 0, 1, 2
PROBE_BYTES = 4 << 20  # one broadcast of this size at start: the link's speed, for the cost of moving experts
# Rank 0 gives up on a collective after TIMEOUT: a follower that slow is hung (one that died fails it at
# once). Followers wait for rank 0's next command as long as it lives: an idle engine sends none.
TIMEOUT = timedelta(seconds=120)
FOLLOWER_WAIT = timedelta(days=365)
READY = b"ready\n"  # a follower's stdout line once its experts are loaded


class ExpertGroupError(RuntimeError):
    """A rank of the expert-parallel group is gone: the group cannot serve any more."""


class ExpertGroup:
    def __init__(self, rank: int, world_size: int, hidden_size: int, top_k: int, dtype: torch.dtype):
        self.rank, self.world_size = rank, world_size
        self.hidden_size, self.top_k, self.dtype = hidden_size, top_k, dtype
        self.followers: list[subprocess.Popen] = []
        self.broken = False  # a collective failed: the ranks may be out of step
        self.bytes_per_second = 0.0  # measured at start (`probe`), then by each move
        self.cost = ExpertCost()  # fitted to rank 0's own expert time per layer and step
        self.wall: dict[int, tuple[float, int]] = {}  # per layer: seconds in run_experts, routed pairs; see take_wall

    # ---- placement --------------------------------------------------------------------------------
    def local_slots(self, placement: Placement) -> list[int]:
        """The logical experts this rank's slots hold under `placement`."""
        per_rank = len(placement.slots) // self.world_size
        return placement.slots[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _local(self, slots: torch.Tensor, per_rank: int) -> torch.Tensor:
        local = slots - self.rank * per_rank
        return torch.where((local >= 0) & (local < per_rank), local, -1)

    # ---- rank 0 -----------------------------------------------------------------------------------
    def run_experts(
        self, layer: int, experts: Experts, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Every rank's experts on the layer's tokens, summed: what Experts gives without parallelism. Three
        collectives (each costs ~0.5 ms over gloo here, more than the data): the header, the tokens with
        their slots and weights packed in one float32 tensor, the sum."""
        try:
            called = time.perf_counter()
            dist.broadcast(torch.tensor([RUN_EXPERTS, layer, x.shape[0]]), 0)
            dist.broadcast(torch.cat([x.float(), slots.float(), weights], dim=1), 0)
            local = self._local(slots, len(experts.slot_experts))
            started = time.perf_counter()
            out = experts(x, local, weights)
            routed = local[local >= 0]
            self.cost.observe(int(routed.unique().numel()), int(routed.numel()), time.perf_counter() - started)
            dist.reduce(out, 0)
            seconds, pairs = self.wall.get(layer, (0.0, 0))
            self.wall[layer] = (seconds + time.perf_counter() - called, pairs + slots.numel())
        except Exception as e:  # gloo's closed peer or timeout; anything else leaves the ranks out of step too
            raise self._broken(e) from e
        return out

    def take_wall(self, layer: int) -> float | None:
        """Seconds per routed token the layer's experts took across the group (the slowest rank, and the
        collectives) since the last call; None when it ran no tokens."""
        seconds, pairs = self.wall.pop(layer, (0.0, 0))
        return seconds / pairs if pairs else None

    def move_experts(self, layer: int, experts: Experts, old: Placement, new: Placement) -> int:
        """Move one layer from `old` to `new` on every rank; returns the bytes that travelled."""
        try:
            dist.broadcast(torch.tensor([MOVE_EXPERTS, layer, len(new.slots)]), 0)
            dist.broadcast(torch.tensor(new.slots), 0)
            started = time.perf_counter()
            moved = self._move(experts, old, new)
        except Exception as e:
            raise self._broken(e) from e
        if moved:
            self.bytes_per_second = moved / (time.perf_counter() - started)
        return moved

    def _move(self, experts: Experts, old: Placement, new: Placement) -> int:
        """Every rank: fill a second buffer with this rank's new share (kept experts copied, the others
        received from a rank holding them), then switch to it."""
        held, share = experts.slot_experts, self.local_slots(new)
        gate_up = experts.gate_up_proj.new_empty(len(share), *experts.gate_up_proj.shape[1:])
        down = experts.down_proj.new_empty(len(share), *experts.down_proj.shape[1:])
        for slot, expert in enumerate(share):
            if expert in held:
                j = held.index(expert)
                gate_up[slot], down[slot] = experts.gate_up_proj[j], experts.down_proj[j]
        requests, transfers = [], plan_moves(old, new, self.world_size)
        for i, (src, dst, expert) in enumerate(transfers):
            if src == self.rank:
                j = held.index(expert)
                requests.append(dist.isend(experts.gate_up_proj[j], dst, tag=2 * i))
                requests.append(dist.isend(experts.down_proj[j], dst, tag=2 * i + 1))
            elif dst == self.rank:
                slot = share.index(expert)
                requests.append(dist.irecv(gate_up[slot], src, tag=2 * i))
                requests.append(dist.irecv(down[slot], src, tag=2 * i + 1))
        for request in requests:
            request.wait()
        for slot, expert in enumerate(share):  # a second copy on this rank: from the first
            if (first := share.index(expert)) != slot:
                gate_up[slot], down[slot] = gate_up[first], down[first]
        experts.hold(share, gate_up, down)
        return len(transfers) * experts.expert_bytes

    def probe(self) -> None:
        """Every rank at start: time one broadcast, the first estimate of `bytes_per_second`."""
        started = time.perf_counter()
        dist.broadcast(torch.zeros(PROBE_BYTES // 4), 0)
        self.bytes_per_second = PROBE_BYTES / (time.perf_counter() - started)

    def _broken(self, error: Exception) -> ExpertGroupError:
        self.broken = True
        return ExpertGroupError(f"expert-parallel group broken: {error}")

    def close(self) -> None:
        """Stop the followers (kill them when the group is out of step) and leave the group."""
        if not self.broken:
            with contextlib.suppress(RuntimeError):  # a follower is gone already
                dist.broadcast(torch.tensor([STOP, 0, 0]), 0)
        self.stop_followers(wait_s=0 if self.broken else 30)
        dist.destroy_process_group()

    def stop_followers(self, wait_s: float = 30) -> None:
        for follower in self.followers:
            try:
                follower.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()

    @classmethod
    def launch(cls, model: str, model_config, config, dtype: torch.dtype) -> "ExpertGroup":
        """Join the group as rank 0 (`config`: EngineConfig). Ranks 1..N-1 are started here, on this host,
        unless `config.expert_parallel_address` is set: then they are started on their own hosts
        (`python -m shared.engine.expert_parallel MODEL --rank R --world-size N --address HOST:PORT`)."""
        if dist.is_initialized():
            raise RuntimeError("this process is in a torch.distributed group already: one expert group each")
        world_size = config.expert_parallel
        group = cls(0, world_size, model_config.hidden_size, model_config.num_experts_per_tok, dtype)
        address = config.expert_parallel_address or f"127.0.0.1:{free_port()}"
        if not config.expert_parallel_address:
            group.start_followers(model, address, config.num_redundant_experts, config.num_threads)
        dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=0, world_size=world_size, timeout=TIMEOUT)
        group.probe()
        return group

    def start_followers(self, model: str, address: str, num_redundant: int, num_threads: int | None) -> None:
        """Ranks 1..N-1 as child processes; returns once each has loaded its experts."""
        for rank in range(1, self.world_size):
            args = [model, "--rank", rank, "--world-size", self.world_size, "--address", address]
            args += ["--num-redundant-experts", num_redundant, "--dtype", str(self.dtype).removeprefix("torch.")]
            if num_threads:
                args += ["--num-threads", num_threads]
            cmd = [sys.executable, "-m", "shared.engine.expert_parallel", *map(str, args)]
            self.followers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
        for rank, follower in enumerate(self.followers, 1):  # loading takes as long as it takes
            if follower.stdout.readline() != READY:
                self.stop_followers(wait_s=0)
                raise ExpertGroupError(f"expert-parallel rank {rank} failed to start (exit code {follower.wait()})")

    # ---- ranks 1..N-1 -----------------------------------------------------------------------------
    def serve(self, experts: dict[int, Experts], placements: dict[int, Placement]) -> None:
        """Follow rank 0's commands until it says stop (or is gone)."""
        while True:
            header = torch.zeros(3, dtype=torch.long)
            dist.broadcast(header, 0)
            command, layer, size = header.tolist()
            if command == STOP:
                return
            if command == MOVE_EXPERTS:
                slots = torch.zeros(size, dtype=torch.long)
                dist.broadcast(slots, 0)
                new = Placement(slots.tolist(), placements[layer].num_experts)
                self._move(experts[layer], placements[layer], new)
                placements[layer] = new
                continue
            tokens = size
            packed = torch.empty(tokens, self.hidden_size + 2 * self.top_k)
            dist.broadcast(packed, 0)
            x, slots, weights = packed.split([self.hidden_size, self.top_k, self.top_k], dim=1)
            x, slots = x.to(self.dtype), slots.long()  # slot numbers are exact in float32
            mine = experts[layer]
            dist.reduce(mine(x, self._local(slots, len(mine.slot_experts)), weights), 0)


def distribute_experts(
    blocks: list[SparseMoeBlock], model_config, checkpoint_path: str, config, dtype: torch.dtype
) -> ExpertGroup:
    """Start the group for this engine (`config`: EngineConfig) and keep rank 0's share of the experts."""
    if not blocks:
        raise ValueError(f"--expert-parallel {config.expert_parallel}: the model has no experts to split")
    placement = default_placement(model_config.num_experts, config.expert_parallel, config.num_redundant_experts)
    group = ExpertGroup.launch(checkpoint_path, model_config, config, dtype)
    for block in blocks:
        block.distribute(group, placement)
    return group


def plan_moves(old: Placement, new: Placement, world_size: int) -> list[tuple[int, int, int]]:
    """(from rank, to rank, expert) for each expert a rank holds under `new` and not under `old`; the same
    list, in the same order, on every rank."""
    per_rank = len(old.slots) // world_size
    old_shares = [old.slots[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]
    moves = []
    for dst in range(world_size):
        for expert in dict.fromkeys(new.slots[dst * per_rank : (dst + 1) * per_rank]):
            if expert not in old_shares[dst]:
                src = next(r for r in range(world_size) if expert in old_shares[r])
                moves.append((src, dst, expert))
    return moves


def follower_experts(ckpt, group: ExpertGroup, num_redundant: int) -> tuple[dict[int, Experts], dict]:
    """This rank's share of every MoE layer's experts, from the checkpoint (the rest is dropped), and the
    layers' placements."""
    config = ckpt.config
    placement = default_placement(config.num_experts, group.world_size, num_redundant)
    share = group.local_slots(placement)
    experts, placements = {}, {}
    for layer in (i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)):
        placements[layer] = placement  # replaced, never changed, by a move
        experts[layer] = Experts(share, config.hidden_size, config.moe_intermediate_size).to(group.dtype)
    for name, tensor in ckpt.weights.items():
        match = EXPERT_TENSOR.fullmatch(checkpoint_name(name))
        if match and (layer := int(match["experts"].split(".")[2])) in experts:
            experts[layer].load_expert(int(match["index"]), match["proj"], tensor)
    return experts, placements


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one follower rank of an expert-parallel group")
    parser.add_argument("model")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--address", required=True, help="rank 0's HOST:PORT")
    parser.add_argument("--num-redundant-experts", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-threads", type=int)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    dtype = getattr(torch, args.dtype)
    ckpt = load_checkpoint(args.model, dtype)
    config = ckpt.config
    group = ExpertGroup(args.rank, args.world_size, config.hidden_size, config.num_experts_per_tok, dtype)
    experts, placements = follower_experts(ckpt, group, args.num_redundant_experts)
    del ckpt
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    dist.init_process_group(
        "gloo", init_method=f"tcp://{args.address}", rank=args.rank, world_size=args.world_size, timeout=FOLLOWER_WAIT
    )
    group.probe()
    with torch.inference_mode():
        try:
            group.serve(experts, placements)
        except RuntimeError:
            sys.exit(1)  # rank 0 is gone
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
