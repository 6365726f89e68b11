"""Train a GPT with its parameters and AdamW state sharded over every rank (FSDP / ZeRO-3 on DTensor).

One command, any number of processes (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node=4 examples/sharded/train.py --stop-at 150  # 4 ranks: one epoch, checkpoints
    torchrun --nproc_per_node=2 examples/sharded/train.py --resume       # the second epoch on 2 ranks

Each rank holds 1/N of every weight matrix and of its Adam moments (``TrainState.create(model, tx,
mesh=mesh)``: rows split ``Shard(0)``; tensors with fewer rows than ranks are replicated). The
step gathers each weight for the forward pass; the backward of that gather reduce-scatters the
gradient, so each rank gets its own rows of the gradient of the whole global batch, and AdamW
updates the local shards. The result equals one process on the whole batch.

The model is the GPT of ``benchmarks/gpt.py`` (pre-LayerNorm blocks, causal attention). The data
is synthetic, so nothing is downloaded: sequences from a fixed random Markov chain in which every
token has ``--successors`` possible next tokens, equally likely. The model has to learn the chain;
no model can do better than the chain's entropy, printed as the loss floor (about ln 4 = 1.386).

A checkpoint saved on N ranks resumes on M: each rank reads its shards of the new layout. The data
loader's position is per rank, so a resume on another number of ranks restarts the epoch it was
in (with a warning); stopped at an epoch's end, as above, it continues exactly.

Writes to ``--out`` (default ``runs/sharded``): ``checkpoints/`` (each rank writes its own shards;
``--resume`` continues from the latest, on any number of ranks), ``log.jsonl`` and ``results.json``
(the held-out loss).

Smoke run: ``--steps 5 --width 16 --layers 1 --vocab 64 --context 8``.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import functrain as ft

# The model is the benchmarks' GPT: benchmarks/ is a folder of scripts, not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpt import GPT, GPTConfig, lm_loss  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="runs/sharded", help="checkpoints and logs go here")
parser.add_argument(
    "--steps", type=int, default=300, help="the run's length (the lr schedule's), resumed steps included"
)
parser.add_argument("--stop-at", type=int, help="stop at this step (as a preempted job would); --resume continues")
parser.add_argument("--batch-size", type=int, default=32, help="global batch (sequences), split over the ranks")
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--vocab", type=int, default=512)
parser.add_argument("--width", type=int, default=128)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--context", type=int, default=64)
parser.add_argument("--train-sequences", type=int, default=4800, help="training set size (4800: 150 steps an epoch)")
parser.add_argument("--successors", type=int, default=4, help="possible next tokens of each token in the data")
parser.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
parser.add_argument("--compile", action="store_true", help="compile the step (collectives inside the one graph)")
parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# ----------------------------------------------------------------------------- processes and the mesh
# torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python train.py` is a world of one.
if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
else:
    device = torch.device("cpu")
if "WORLD_SIZE" in os.environ:
    ft.distributed.init()  # collectives time out after 10 minutes instead of hanging
else:  # one process: a world of one on a local port, so the same code runs
    ft.distributed.init("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
rank, world = ft.distributed.rank(), ft.distributed.world_size()
main = ft.distributed.is_main_process()  # rank 0 alone prints and logs
say = print if main else (lambda *a, **k: None)
mesh = init_device_mesh(device.type, (world,))  # shard over every rank


# ----------------------------------------------------------------------------- data: a random Markov chain
class MarkovSequences(torch.utils.data.Dataset):
    """``count`` sequences of ``length + 1`` tokens; sample i is (its first ``length``, its last ``length``)."""

    def __init__(self, successors: torch.Tensor, count: int, length: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        vocab, k = successors.shape
        tokens = [torch.randint(vocab, (count,), generator=g)]
        for _ in range(length):
            choice = torch.randint(k, (count,), generator=g)
            tokens.append(successors[tokens[-1], choice])
        self.seqs = torch.stack(tokens, 1)

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i, :-1], self.seqs[i, 1:]


def entropy_floor(successors: torch.Tensor, data: MarkovSequences) -> float:
    """The chain's own cross-entropy on ``data``: -log P(next | previous), averaged over every target."""
    prev, nxt = data.seqs[:, :-1].flatten(), data.seqs[:, 1:].flatten()
    p = (successors[prev] == nxt[:, None]).float().mean(1)  # duplicates in a row make a token likelier
    return -p.log().mean().item()


chain = torch.Generator().manual_seed(args.seed)
successors = torch.randint(args.vocab, (args.vocab, args.successors), generator=chain)
train_set = MarkovSequences(successors, args.train_sequences, args.context, seed=args.seed + 1)
held_out = MarkovSequences(successors, 256, args.context, seed=args.seed + 2)
per_rank = ft.distributed.per_rank_batch_size(args.batch_size)
# Each rank loads its own share of every global batch, as in data parallel; the sharded step
# averages the gradient over all of them.
train_loader = ft.data.make_loader(train_set, per_rank, seed=args.seed, num_workers=1, device=device,
                                   rank=rank, world_size=world)  # fmt: skip
eval_loader = ft.data.make_loader(held_out, per_rank, shuffle=False, num_workers=1, device=device,
                                  rank=rank, world_size=world)  # fmt: skip

# ----------------------------------------------------------------------------- model, optimiser, step
cfg = GPTConfig(args.vocab, args.width, args.layers, args.heads, args.context, args.batch_size)
torch.manual_seed(args.seed)
model = GPT(cfg).to(device)
tx = ft.chain(
    ft.clip_by_global_norm(1.0),  # the norm of the whole gradient: the shards' squares summed over ranks
    ft.adamw(lr=ft.schedules.warmup_cosine(args.lr, max(1, min(20, args.steps // 10)), args.steps), weight_decay=0.1),
)
state = ft.TrainState.create(model, tx, mesh=mesh)  # params and AdamW moments: DTensors, 1/N per rank
step = ft.make_train_step(model, lm_loss, tx, mesh=mesh, compile=args.compile)
evaluate = ft.make_eval_step(model, lm_loss, mesh=mesh)


def local_bytes(tree) -> int:
    """Bytes this rank holds of ``tree``'s tensors (a DTensor's local shard only)."""
    leaves = (getattr(t, "_local_tensor", t) for t in ft._tree.leaves(tree))
    return sum(t.numel() * t.element_size() for t in leaves)


n_params = sum(p.numel() for p in state.params.values())
held = local_bytes((state.params, state.opt_state)) / 2**20
whole = (n_params * 4 * 3) / 2**20  # float32 params and two Adam moments
say(
    f"GPT: {n_params:,} parameters, sharded over {world} rank(s) ({device}); params + AdamW state per rank "
    f"{held:.2f} MiB of {whole:.2f} MiB. Data: a Markov chain over {args.vocab} tokens, "
    f"{args.successors} successors each: loss floor {entropy_floor(successors, held_out):.3f} nats."
)


class Timer(ft.Callback):
    """Wall time per step over each logged interval, on rank 0 (the others run in lockstep)."""

    main_process_only = True

    def on_fit_start(self, loop):
        self.t, self.step = time.perf_counter(), loop.step

    def on_log(self, loop):
        now = time.perf_counter()
        per_step = (now - self.t) / max(loop.step - self.step, 1)
        print(f"step {loop.step:5d}  train loss {loop.logs['loss']:.4f}  {1000 * per_step:6.1f} ms/step")
        self.t, self.step = now, loop.step


out = Path(args.out)
checkpoint = ft.callbacks.Checkpoint(out / "checkpoints", every_steps=args.save_every, keep=2)
resume = (ft.latest_checkpoint(out / "checkpoints") or False) if args.resume else False
if args.resume:
    say(f"Resuming from {resume}" if resume else f"No checkpoint in {out / 'checkpoints'}: starting afresh")
callbacks = [ft.callbacks.StopOnNonFinite(), Timer(), ft.callbacks.JSONLogger(out / "log.jsonl")]
state, history = ft.fit(step, state, train_loader, steps=args.stop_at or args.steps, callbacks=callbacks,
                        checkpoint=checkpoint, resume=resume, log_every=25)  # fmt: skip

meter = ft.MeanMetrics()
for batch in eval_loader:
    meter.add(evaluate(state, batch))  # each rank its part; the eval step averages over the mesh
held_out_loss = float(meter.means()["loss"])
say(f"Held-out loss {held_out_loss:.4f} (perplexity {math.exp(held_out_loss):.2f}) after {int(state.step)} steps")
if main:
    result = {"step": int(state.step), "world": world, "held_out_loss": held_out_loss}
    (out / "results.json").write_text(json.dumps(result, indent=2))
dist.destroy_process_group()
