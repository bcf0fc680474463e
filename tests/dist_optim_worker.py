"""Worker for tests/test_data_parallel.py, run under `torchrun --nproc_per_node=2` (gloo, CPU).

Trains a tiny GPT for a few steps two ways and saves what the test compares:
  - data parallel: each of the W ranks runs k micro-steps (its share of the batch) and DistMuonAdamW steps;
  - one process (rank 0 alone): MuonAdamW over all W * k micro-steps of the same batches.
Twice: with the default ownership rule (small AdamW tensors replicated) and with min_shard_numel=1 (every
tensor sharded, so 1- and 3-element tensors are padded and some ranks own nothing of them).
Writes <out>/rank<r>.pt with the parameters, the optimizer shard and its state bytes.
"""
import sys

import torch
import torch.distributed as dist

from nanotrain.model import GPTConfig, build_model
from nanotrain.optim import DistMuonAdamW, MuonAdamW, build_optimizer

# n_layer=3: the Muon groups hold 3 or 6 matrices (3 does not divide by 2 ranks); n_kv_head < n_head gives
# the k/v projections their own shape; vocab 67 gives odd-sized embeddings.
CONFIG = GPTConfig(sequence_len=16, vocab_size=67, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, window_pattern="SL")
LRS = dict(embedding_lr=0.3, unembedding_lr=0.01, matrix_lr=0.05, scalar_lr=0.5, weight_decay=0.1)
STEPS, MICRO, BATCH = 3, 2, 2  # optimizer steps, micro-steps per rank per step, rows per micro-batch


def batches(world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same data on every rank: per step, world * MICRO micro-batches of (BATCH, T) tokens."""
    g = torch.Generator().manual_seed(7)
    T = CONFIG.sequence_len
    out = []
    for _ in range(STEPS):
        xy = torch.randint(0, CONFIG.vocab_size, (world * MICRO, BATCH, T + 1), generator=g)
        out.append([(row[:, :-1], row[:, 1:]) for row in xy])
    return out


def train(opt, model, data, first: int, count: int) -> None:
    """STEPS optimizer steps, each over micro-batches [first, first + count) of the step (loss averaged)."""
    for step_data in data:
        for x, y in step_data[first:first + count]:
            (model(x, y) / count).backward()
        opt.step()
        model.zero_grad(set_to_none=True)


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(world)
    result = {}
    for name, min_shard in (("default", 1024), ("all_sharded", 1)):
        model = build_model(CONFIG, "cpu").double()  # same seed on every rank
        start = {k: v.clone() for k, v in model.state_dict().items()}
        opt = build_optimizer(model, **LRS)
        assert isinstance(opt, DistMuonAdamW), type(opt)
        opt.min_shard_numel = min_shard
        train(opt, model, data, rank * MICRO, MICRO)
        entry = {"dist_params": {k: v.clone() for k, v in model.state_dict().items()},
                 "shard": opt.state_dict(), "state_bytes": state_bytes(opt)}
        if rank == 0:  # the single-process reference on the same data: all world * MICRO micro-batches
            ref = build_model(CONFIG, "cpu").double()
            ref.load_state_dict(start)
            ref_opt = build_optimizer(ref, **LRS, sharded=False)
            assert type(ref_opt) is MuonAdamW
            train(ref_opt, ref, data, 0, world * MICRO)
            entry.update(single_params=ref.state_dict(), single_state=ref_opt.state_dict(),
                         single_state_bytes=state_bytes(ref_opt))
        result[name] = entry
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
