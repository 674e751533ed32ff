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
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.engine.eplb import Placement, default_placement
from shared.engine.loader import load_checkpoint
from shared.engine.moe import EXPERT_TENSOR, Experts, SparseMoeBlock, checkpoint_name

STOP, RUN_EXPERTS = 0, 1
TIMEOUT = timedelta(seconds=120)  # joining, or a collective, that long means a rank is gone


class ExpertGroupError(RuntimeError):
    """A rank of the expert-parallel group is gone: the group cannot serve any more."""


class ExpertGroup:
    def __init__(self, rank: int, world_size: int, hidden_size: int, top_k: int, dtype: torch.dtype):
        self.rank, self.world_size = rank, world_size
        self.hidden_size, self.top_k, self.dtype = hidden_size, top_k, dtype
        self.followers: list[subprocess.Popen] = []

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
            dist.broadcast(torch.tensor([RUN_EXPERTS, layer, x.shape[0]]), 0)
            dist.broadcast(torch.cat([x.float(), slots.float(), weights], dim=1), 0)
            out = experts(x, self._local(slots, len(experts.slot_experts)), weights)
            dist.reduce(out, 0)
        except RuntimeError as e:  # gloo reports a closed peer or a timeout this way
            raise ExpertGroupError(f"expert-parallel group broken: {e}") from e
        return out

    def close(self) -> None:
        """Stop the followers and leave the group."""
        with contextlib.suppress(RuntimeError):  # a follower is gone already
            dist.broadcast(torch.tensor([STOP, 0, 0]), 0)
        for follower in self.followers:
            try:
                follower.wait(timeout=30)
            except subprocess.TimeoutExpired:
                follower.kill()
        dist.destroy_process_group()

    @classmethod
    def launch(
        cls, model: str, world_size: int, num_redundant: int, config, dtype: torch.dtype, num_threads: int | None
    ) -> "ExpertGroup":
        """Start ranks 1..N-1 on this host and join them as rank 0."""
        if dist.is_initialized():
            raise RuntimeError("this process is in a torch.distributed group already: one expert group each")
        address = f"127.0.0.1:{_free_port()}"
        group = cls(0, world_size, config.hidden_size, config.num_experts_per_tok, dtype)
        for rank in range(1, world_size):
            args = [model, "--rank", rank, "--world-size", world_size, "--address", address]
            args += ["--num-redundant-experts", num_redundant, "--dtype", str(dtype).removeprefix("torch.")]
            if num_threads:
                args += ["--num-threads", num_threads]
            cmd = [sys.executable, "-m", "shared.engine.expert_parallel", *map(str, args)]
            group.followers.append(subprocess.Popen(cmd))
        dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=0, world_size=world_size, timeout=TIMEOUT)
        return group

    # ---- ranks 1..N-1 -----------------------------------------------------------------------------
    def serve(self, experts: dict[int, Experts]) -> None:
        """Follow rank 0's commands until it says stop (or is gone)."""
        while True:
            header = torch.zeros(3, dtype=torch.long)
            dist.broadcast(header, 0)
            command, layer, tokens = header.tolist()
            if command == STOP:
                return
            packed = torch.empty(tokens, self.hidden_size + 2 * self.top_k)
            dist.broadcast(packed, 0)
            x, slots, weights = packed.split([self.hidden_size, self.top_k, self.top_k], dim=1)
            x, slots = x.to(self.dtype), slots.long()  # slot numbers are exact in float32
            mine = experts[layer]
            dist.reduce(mine(x, self._local(slots, len(mine.slot_experts)), weights), 0)


def distribute_experts(model, checkpoint_path: str, config, dtype: torch.dtype) -> ExpertGroup:
    """Start the group for this engine (`config`: EngineConfig) and keep rank 0's share of the experts."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if not blocks:
        raise ValueError(f"--expert-parallel {config.expert_parallel}: the model has no experts to split")
    num_experts = model.config.num_experts
    placement = default_placement(num_experts, config.expert_parallel, config.num_redundant_experts)  # checks
    group = ExpertGroup.launch(
        checkpoint_path, config.expert_parallel, config.num_redundant_experts, model.config, dtype, config.num_threads
    )
    for block in blocks:
        block.distribute(group, placement)
    return group


def follower_experts(ckpt, group: ExpertGroup, num_redundant: int) -> dict[int, Experts]:
    """This rank's share of every MoE layer's experts, from the checkpoint (the rest is dropped)."""
    config = ckpt.config
    experts = {}
    for layer in (i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)):
        placement = default_placement(config.num_experts, group.world_size, num_redundant)
        experts[layer] = Experts(group.local_slots(placement), config.hidden_size, config.moe_intermediate_size)
        experts[layer].to(group.dtype)
    for name, tensor in ckpt.weights.items():
        match = EXPERT_TENSOR.fullmatch(checkpoint_name(name))
        if match and (layer := int(match["experts"].split(".")[2])) in experts:
            experts[layer].load_expert(int(match["index"]), match["proj"], tensor)
    return experts


def _free_port() -> int:
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
    experts = follower_experts(ckpt, group, args.num_redundant_experts)
    del ckpt
    dist.init_process_group(
        "gloo", init_method=f"tcp://{args.address}", rank=args.rank, world_size=args.world_size, timeout=TIMEOUT
    )
    with torch.inference_mode():
        try:
            group.serve(experts)
        except RuntimeError:
            sys.exit(1)  # rank 0 is gone
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
