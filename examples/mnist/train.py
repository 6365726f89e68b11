"""Train a CNN from scratch on handwritten digits: augmented data pipeline, compiled step, checkpoints, logs.

Run with no arguments (about a minute on 2 CPU cores, compilation included; ~99% held out)::

    python examples/mnist/train.py            # then: python examples/mnist/evaluate.py

Data: real MNIST when its files are under ``--data-dir`` (default ``./data``; pass ``--data-dir DIR``
to download it there when online). Otherwise the run says so and uses the real dataset that ships
inside scikit-learn: 1,797 handwritten digits, upscaled from 8x8 to MNIST's 28x28. Either way a
held-out split is evaluated after every epoch.

Writes to ``--out`` (default ``runs/mnist``): ``checkpoints/step-*.pt`` (everything a resume needs;
``--resume`` continues from the latest), ``log.jsonl`` (one JSON object per log and evaluation),
``tensorboard/`` (``tensorboard --logdir runs/mnist``; when tensorboard is installed) and
``config.json`` (what evaluate.py needs to rebuild the model and the data).

Data parallel, unchanged: ``torchrun --nproc_per_node=2 examples/mnist/train.py`` runs one process
per rank (gloo on CPU, NCCL on GPUs). Each rank loads its own share of every epoch and of the
global batch, gradients are averaged across ranks inside the step, and rank 0 logs and saves.

Smoke run: ``--steps 5 --no-compile``.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import CNN, load_data, loss_fn, make_optimiser, mnist_on_disk
from torchvision.transforms import v2

import functrain as ft

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-dir", help="folder holding MNIST/raw/ (downloaded there when missing); default ./data")
parser.add_argument("--out", default="runs/mnist", help="checkpoints, logs and config go here")
parser.add_argument("--epochs", type=int, help="default: 10 on the digits, 3 on MNIST")
parser.add_argument("--steps", type=int, help="train this many steps instead of --epochs (smoke runs)")
parser.add_argument("--batch-size", type=int, default=64, help="global batch size, split over the ranks")
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--no-compile", action="store_true", help="run the step eagerly (no torch.compile warm-up)")
parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--workers", type=int, default=2, help="data-loading threads per process")
args = parser.parse_args()

# ----------------------------------------------------------------------------- processes and devices
# torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python train.py` is a world of one.
distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
if distributed:
    # A collective timeout (10 minutes): a stalled rank makes the others raise instead of waiting 30.
    ft.distributed.init("nccl" if torch.cuda.is_available() else "gloo")
rank, world_size = ft.distributed.rank(), ft.distributed.world_size()
main = ft.distributed.is_main_process()  # rank 0 alone prints, logs and saves
if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
else:
    device = torch.device("cpu")
say = print if main else (lambda *a, **k: None)

# ----------------------------------------------------------------------------- data
data_dir = args.data_dir or "data"
if args.data_dir is not None or mnist_on_disk(data_dir):
    source = "mnist"
    say(f"Data: MNIST from {os.path.abspath(data_dir)} (torchvision; downloaded there if missing)")
else:
    source = "digits"
    say(
        f"Data: no MNIST under {os.path.abspath(data_dir)}/MNIST/raw, so training on the embedded real dataset: "
        "scikit-learn's 1,797 handwritten digits (8x8 scans upscaled to 28x28), 20% held out.\n"
        "      Pass --data-dir DIR to use (and, when online, download) MNIST."
    )
if distributed and source == "mnist" and rank != 0:
    dist.barrier()  # rank 0 downloads first; the others then find the files
train_set, test_set = load_data(source, data_dir)
if distributed and source == "mnist" and rank == 0:
    dist.barrier()

# Augmentation runs per sample in the loader's workers (processes on Linux), on uint8 CHW tensors, with a random
# stream seeded by (seed, epoch, sample): an interrupted and resumed run sees the same pictures.
augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
train_loader = ft.data.make_loader(
    train_set,
    batch_size=ft.distributed.per_rank_batch_size(args.batch_size),
    seed=args.seed,
    transform=augment,
    num_workers=args.workers,
    device=device,
    rank=rank,  # each rank gets a disjoint share of every epoch (DistributedSampler's split)
    world_size=world_size,
)
# One evaluation batch covers the digits' 359 test images; MNIST's 10,000 come in 10.
test_loader = ft.data.make_loader(test_set, batch_size=1000, shuffle=False, drop_last=False, device=device)

epochs = args.epochs or (10 if source == "digits" else 3)
total_steps = args.steps or epochs * len(train_loader)

# ----------------------------------------------------------------------------- model, optimiser, step
torch.manual_seed(args.seed)
model = CNN().to(device)
tx = make_optimiser(total_steps, args.lr, distributed)
state = ft.TrainState.create(model, tx)
if distributed:
    state = ft.distributed.broadcast_state(state)  # every rank starts from rank 0's weights
    torch.manual_seed(args.seed + rank)  # but draws its own dropout masks

step = ft.make_train_step(
    model,
    loss_fn,
    tx,
    # One graph for forward, backward and AdamW; the scheduled lr is a tensor, so no recompiles.
    compile=not args.no_compile,
    # Average BatchNorm's running statistics over the ranks, so every rank evaluates the same model.
    reduce_buffers=ft.distributed.mean_over_ranks if distributed else None,
)
evaluate = ft.make_eval_step(model, loss_fn)  # eager: one or ten batches per epoch are not worth compiling


class PrintEval(ft.Callback):
    """One line per evaluation, for logs that are not a terminal (the progress bar hides itself there)."""

    main_process_only = True  # rank 0 speaks for every rank

    def on_eval_end(self, loop):
        train = loop.history["train"][-1]
        print(
            f"epoch {loop.epoch:3d}  step {loop.step:5d}  train loss {train['loss']:.4f}  "
            f"held-out loss {loop.eval_logs['loss']:.4f}  held-out acc {loop.eval_logs['acc']:.4f}"
        )


out = Path(args.out)
if main:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"data": source, "data_dir": os.path.abspath(data_dir)}, indent=2))
# Every rank runs the same callbacks: the loop calls the progress bar and the loggers on rank 0 only
# (their main_process_only), and every rank takes part in each checkpoint, which rank 0 writes.
callbacks = [ft.callbacks.StopOnNonFinite(), ft.callbacks.ProgressBar(), PrintEval()]
callbacks.append(ft.callbacks.JSONLogger(out / "log.jsonl"))
try:
    callbacks.append(ft.callbacks.TensorBoard(out / "tensorboard"))
except ImportError:
    say("TensorBoard logging off: pip install tensorboard to turn it on")
checkpoint = ft.callbacks.Checkpoint(out / "checkpoints", keep=2)
# Every rank resumes from the file rank 0 wrote: all need the same state and the same loader position.
resume = (ft.latest_checkpoint(out / "checkpoints") or False) if args.resume else False

# ----------------------------------------------------------------------------- train
say(
    f"Training {sum(p.numel() for p in state.params.values()):,} parameters on {len(train_set)} images for "
    f"{total_steps} steps ({world_size} process(es), {device}, {'eager' if args.no_compile else 'compiled'})"
)
start = time.perf_counter()
state, history = ft.fit(
    step,
    state,
    train_loader,
    **({"steps": args.steps} if args.steps else {"epochs": epochs}),  # whole epochs end with an evaluation
    eval_step=evaluate,
    eval_loader=test_loader,
    callbacks=callbacks,
    checkpoint=checkpoint,
    resume=resume,
    log_every=10,
    device=device,
)
elapsed = time.perf_counter() - start

# A last evaluation of the final state (a --steps run may end mid-epoch, after the last one fit made).
meter = ft.MeanMetrics()
for batch in test_loader:
    meter.add(evaluate(state, batch))
final = {name: float(value) for name, value in meter.means().items()}
say(f"Held-out accuracy {final['acc']:.4f} after {int(state.step)} steps in {elapsed:.0f}s ({source})")
if main:
    say(f"Checkpoint: {ft.latest_checkpoint(out / 'checkpoints')}; logs: {out / 'log.jsonl'}")
if distributed:
    dist.destroy_process_group()
