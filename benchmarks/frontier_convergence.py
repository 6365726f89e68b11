"""Convergence of the frontier optimisers (issue 18) next to AdamW: the benchmarks' GPT and CNN trained
for a fixed number of steps on the same synthetic data, loss curves plotted.

    .venv/bin/python benchmarks/frontier_convergence.py          # the committed run (see README.md)
    .venv/bin/python benchmarks/frontier_convergence.py --smoke  # tiny models, 4 steps each: seconds

writes ``benchmarks/results/frontier-convergence.json`` (per optimiser and model: the training loss
at every step, the held-out loss (and accuracy) every ``--eval-every`` steps, the wall-clock time,
the configuration) and ``frontier-convergence.png`` (the curves; needs matplotlib). ``--smoke``
writes to ``/tmp`` unless ``--out`` is given.

Models (their definitions are the benchmarks', imported, not copied):

- ``gpt``: ``gpt.GPT`` (benchmarks/gpt.py) with the ``gpt-step`` group's context and heads (64, 4) at
  width 128 and 4 blocks (its full 6 x 256 takes ~3 s a step on a shared 2-core machine, too long
  for a dozen runs) and a 256-token vocabulary, on sequences from a fixed random Markov chain in
  which each token has 4 equally likely successors (as examples/sharded does): no model can do
  better than the chain's entropy, about ln 4 = 1.386 nats, printed as the floor. 8 fresh sequences
  a step; held-out: 128 other sequences.
- ``cnn``: ``bench_step.cnn_bn((32, 64, 128))`` (the ``cnn-bn-step`` group's model: three
  conv+BatchNorm+ReLU blocks, global average pooling, linear) on 32x32x3 images of 10 classes: each
  class a fixed smooth random pattern, each image its class's pattern at a random contrast, shifted
  by up to 4 pixels and under Gaussian noise (std 1.0, the pattern's own scale), 64 fresh images a
  step; held-out: 512 others.

Every optimiser trains the same initialisation (seed 0) on the same batches in the same order, with an
eager ``ft.make_train_step`` (the BatchNorm statistics carried in the state). The learning rate
follows ``warmup_cosine`` (linear warm-up over the first 10% of the steps from 0, cosine decay to 0)
at the peak in :data:`RUNS` for every entry but ``adamw-wsd`` (``warmup_stable_decay``, the same
warm-up, a stable peak and a linear decay over the last 20%). The learning-rate-free methods
(prodigy, dadapt_adam) run at ``lr=1`` through the same schedule, their documented use. Optimisers
functrain does not have are skipped by name and listed in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import gpt  # noqa: E402 - benchmarks/gpt.py: the gpt-step group's model
from bench_step import cnn_bn  # noqa: E402 - the cnn-bn-step group's model

import functrain as ft  # noqa: E402

RESULTS = HERE / "results"
WEIGHT_DECAY = 0.01  # decoupled where the optimiser decouples it; the same value for every entry that takes one


@dataclass(frozen=True)
class Run:
    """One entry: ``make(lr)`` builds the transform from the learning rate (a schedule)."""

    name: str
    needs: tuple[str, ...]  # the ft names it uses: skipped when one is missing
    make: Callable[[ft.Schedule], ft.GradientTransformation]
    lr: dict[str, float]  # peak learning rate by model
    schedule: str = "warmup_cosine"


def _ft(name: str):
    return getattr(ft, name)


ADAMW_LR = {"gpt": 1e-3, "cnn": 3e-3}
RUNS = [
    Run("adamw", ("adamw",), lambda lr: ft.adamw(lr=lr, weight_decay=WEIGHT_DECAY), ADAMW_LR),
    Run(
        "adamw-wsd",
        ("adamw",),
        lambda lr: ft.adamw(lr=lr, weight_decay=WEIGHT_DECAY),
        ADAMW_LR,
        schedule="warmup_stable_decay",
    ),
    Run("soap", ("soap",), lambda lr: _ft("soap")(lr=lr, weight_decay=WEIGHT_DECAY), {"gpt": 3e-3, "cnn": 3e-3}),
    # psgd_kron at HeavyBall's default lr (1e-3) ended last on both models (held-out 2.22 on the gpt,
    # 0.34 on the cnn); of 3e-4, 1e-3, 3e-3 and 1e-2 (its only sweep: the others run at one usual lr),
    # 1e-2 was best on both (1.524 and 0.0010).
    Run("psgd_kron", ("psgd_kron",), lambda lr: _ft("psgd_kron")(lr=lr), {"gpt": 1e-2, "cnn": 1e-2}),
    Run("prodigy", ("prodigy",), lambda lr: _ft("prodigy")(lr=lr, weight_decay=WEIGHT_DECAY), {"gpt": 1.0, "cnn": 1.0}),
    Run(
        "dadapt_adam",
        ("dadapt_adam",),
        lambda lr: _ft("dadapt_adam")(lr=lr, weight_decay=WEIGHT_DECAY, decouple=True),
        {"gpt": 1.0, "cnn": 1.0},
    ),
    Run(
        "adopt",
        ("adopt",),
        lambda lr: _ft("adopt")(lr=lr, weight_decay=WEIGHT_DECAY, decoupled_weight_decay=True),
        ADAMW_LR,
    ),
    Run("ademamix", ("ademamix",), lambda lr: _ft("ademamix")(lr=lr, weight_decay=WEIGHT_DECAY), ADAMW_LR),
    Run("mars", ("mars",), lambda lr: _ft("mars")(lr=lr, weight_decay=WEIGHT_DECAY), {"gpt": 3e-3, "cnn": 3e-3}),
    Run(
        "cautious(adamw)",
        ("cautious",),
        lambda lr: _ft("cautious")(ft.adamw(lr=lr, weight_decay=WEIGHT_DECAY)),
        ADAMW_LR,
    ),
    Run(
        "sam(adamw, rho=0.05)",
        ("sam",),
        lambda lr: _ft("sam")(ft.adamw(lr=lr, weight_decay=WEIGHT_DECAY), rho=0.05),
        ADAMW_LR,
    ),
    Run(
        "low_precision_state(adamw)",
        ("low_precision_state",),
        lambda lr: _ft("low_precision_state")(ft.adamw(lr=lr, weight_decay=WEIGHT_DECAY)),
        ADAMW_LR,
    ),
]
# ft.lbfgs is left out: a full-batch method (a line search on one deterministic loss), not for these
# mini-batch runs.


def schedule(run: Run, peak: float, steps: int) -> ft.Schedule:
    warmup = max(1, steps // 10)
    if run.schedule == "warmup_stable_decay":
        decay = max(1, steps // 5)
        return ft.schedules.warmup_stable_decay(
            peak_value=peak, warmup_steps=warmup, stable_steps=steps - warmup - decay, decay_steps=decay
        )
    return ft.schedules.warmup_cosine(peak_lr=peak, warmup_steps=warmup, total_steps=steps)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Task:
    name: str
    make_model: Callable[[], nn.Module]
    loss: Callable
    batch: Callable[[int], tuple[Tensor, Tensor]]  # step -> the step's batch (the same for every optimiser)
    held_out: tuple[Tensor, Tensor]
    floor: float | None  # the best possible held-out loss, where known
    description: str


class Markov:
    """Sequences from a fixed random Markov chain: each token has ``successors`` equally likely next tokens."""

    def __init__(self, vocab: int, successors: int, context: int, seed: int = 0):
        self.table = torch.randint(vocab, (vocab, successors), generator=torch.Generator().manual_seed(seed))
        self.context = context

    def sample(self, count: int, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        vocab, k = self.table.shape
        tokens = [torch.randint(vocab, (count,), generator=g)]
        for _ in range(self.context):
            tokens.append(self.table[tokens[-1], torch.randint(k, (count,), generator=g)])
        seqs = torch.stack(tokens, 1)
        return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()

    def entropy(self, targets: tuple[Tensor, Tensor]) -> float:
        """The chain's own cross-entropy on a sample: -log P(next | previous), averaged over its targets."""
        prev, nxt = targets[0].flatten(), targets[1].flatten()
        p = (self.table[prev] == nxt[:, None]).double().mean(1)  # a repeated successor is likelier
        return float(-p.log().mean())


class Patterns:
    """10 classes of 3 x side x side images: a fixed smooth random pattern per class, each image its
    pattern at a random contrast in [0.5, 1.5], rolled by up to ``side // 8`` pixels each way, plus
    Gaussian noise of std ``noise``."""

    def __init__(self, side: int, classes: int = 10, noise: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(classes, 3, 4, 4, generator=g)
        patterns = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
        self.patterns = patterns / patterns.flatten(1).std(1)[:, None, None, None]
        self.noise, self.shift = noise, max(1, side // 8)

    def sample(self, count: int, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(len(self.patterns), (count,), generator=g)
        contrast = 0.5 + torch.rand(count, 1, 1, 1, generator=g)
        shifts = torch.randint(-self.shift, self.shift + 1, (count, 2), generator=g)
        images = torch.stack(
            [torch.roll(self.patterns[c], (int(dy), int(dx)), dims=(1, 2)) for c, (dy, dx) in zip(labels, shifts)]
        )
        images = contrast * images + self.noise * torch.randn(images.shape, generator=g)
        return images, labels


def classification_loss(model: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}


HELD_OUT_SEED = 10**6  # batch seeds are the step numbers: the held-out data never appears in training


def tasks(smoke: bool) -> dict[str, Task]:
    if smoke:
        cfg = gpt.GPTConfig(vocab=64, width=16, layers=1, heads=2, context=8, batch=4)
        channels, side, images, held_images = (4, 8), 8, 8, 16
    else:
        # gpt.FULL's context and heads at width 128 and 4 blocks (gpt.FULL is 6 x 256: ~3 s a step
        # on the shared 2-core box, too long for a dozen runs).
        cfg = gpt.GPTConfig(vocab=256, width=128, layers=4, heads=4, context=gpt.FULL.context, batch=8)
        channels, side, images, held_images = (32, 64, 128), 32, 32, 512
    markov = Markov(cfg.vocab, successors=4, context=cfg.context)
    gpt_held = markov.sample(8 if smoke else 128, HELD_OUT_SEED)
    patterns = Patterns(side)
    return {
        "gpt": Task(
            "gpt",
            lambda: gpt.gpt(cfg, seed=0),
            gpt.lm_loss,
            lambda step: markov.sample(cfg.batch, step),
            gpt_held,
            markov.entropy(gpt_held),
            f"gpt.GPT(vocab={cfg.vocab}, width={cfg.width}, layers={cfg.layers}, heads={cfg.heads}, "
            f"context={cfg.context}); Markov chain, 4 successors per token; {cfg.batch} sequences a step",
        ),
        "cnn": Task(
            "cnn",
            lambda: _seeded(lambda: cnn_bn(channels), 0),
            classification_loss,
            lambda step: patterns.sample(images, step),
            patterns.sample(held_images, HELD_OUT_SEED),
            None,
            f"bench_step.cnn_bn({channels}); {side}x{side}x3 pattern images of 10 classes, noise std 1.0; "
            f"{images} images a step",
        ),
    }


def _seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make()


# ----------------------------------------------------------------------------- training


def train(task: Task, run: Run, steps: int, eval_every: int) -> dict:
    model = task.make_model()
    peak = run.lr[task.name]
    tx = run.make(schedule(run, peak, steps))
    state = ft.TrainState.create(model, tx)
    step = ft.make_train_step(model, task.loss, tx)
    evaluate = ft.make_eval_step(model, task.loss)
    losses: list[float] = []
    held: list[dict] = []
    times: list[float] = []

    def held_out(at: int) -> None:
        metrics = {k: float(v) for k, v in evaluate(state, task.held_out).items()}
        held.append({"step": at, **metrics})

    held_out(0)
    for i in range(steps):
        batch = task.batch(i)  # generated outside the timed region: the same cost for every optimiser
        start = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])  # synchronises: the step's time includes its work
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if not math.isfinite(loss):
            break
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            held_out(i + 1)
    return {
        "optimizer": run.name,
        "peak_lr": peak,
        "schedule": run.schedule,
        "steps": len(losses),
        "train_loss": losses,
        "held_out": held,
        "final_held_out_loss": held[-1]["loss"],
        "final_held_out_accuracy": held[-1].get("accuracy"),
        "wall_clock_s": sum(times),  # the steps alone: no data generation, no held-out evaluation
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_first": 1e3 * times[0],  # includes the optimiser's first-call costs
        "diverged": not math.isfinite(losses[-1]),
    }


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as training dashboards draw a noisy loss)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, name in zip(axes[0], models):
        model = results["models"][name]
        for i, (opt, r) in enumerate(model["runs"].items()):
            style = dict(color=f"C{i % 10}", linestyle="-" if i < 10 else "--", linewidth=1.2)
            ax.plot(range(1, len(r["train_loss"]) + 1), smooth(r["train_loss"]), label=opt, **style)
            ax.plot([h["step"] for h in r["held_out"]], [h["loss"] for h in r["held_out"]], "o", ms=3, **style)
        if model.get("floor") is not None:
            ax.axhline(model["floor"], color="k", linestyle=":", linewidth=1, label="entropy floor")
        ax.set_title(f"{name}: {model['description']}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (line: training, EMA 0.9; dots: held-out)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table(results: dict) -> str:
    """Markdown, one row per model and optimiser: peak lr, held-out loss (and accuracy) at the end, the
    mean training loss over the last 10% of the steps, the step at which the smoothed training loss
    first reached AdamW's final smoothed value, and the median step time."""
    lines = [
        "| model | optimiser | peak lr | held-out loss | held-out acc. | train loss, last 10% | "
        "steps to AdamW's final loss | ms/step (median) | steps' wall clock (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, model in results["models"].items():
        runs = model["runs"]
        target = smooth(runs["adamw"]["train_loss"])[-1] if "adamw" in runs else None
        for opt, r in runs.items():
            losses = r["train_loss"]
            tail = losses[-max(1, len(losses) // 10) :]
            reached = next((i + 1 for i, v in enumerate(smooth(losses)) if target is not None and v <= target), None)
            acc = r.get("final_held_out_accuracy")
            lines.append(
                f"| {name} | {opt} | {r['peak_lr']:g} | {r['final_held_out_loss']:.4f} | "
                f"{'-' if acc is None else f'{acc:.3f}'} | {statistics.fmean(tail):.4f} | "
                f"{'-' if reached is None else reached} | {r['step_ms_median']:.1f} | {r['wall_clock_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 4 steps each (seconds)")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("GPT", "CNN"), default=(200, 200))
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=("gpt", "cnn"), default=("gpt", "cnn"))
    parser.add_argument("--only", nargs="+", help="run only these entries (names as in the JSON)")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default results/frontier-convergence.json; /tmp for --smoke)"
    )
    parser.add_argument("--plot", type=Path, help="PNG path (default: the JSON's, .png)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--merge", action="store_true", help="add to (or replace entries of) an existing JSON instead of a new one"
    )
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the markdown table of a results JSON, run nothing"
    )
    args = parser.parse_args(argv)
    if args.table:
        results = json.loads(args.table.read_text())
        sys.stdout.write(table(results))
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {"gpt": 4, "cnn": 4} if args.smoke else dict(zip(("gpt", "cnn"), args.steps))
    eval_every = 2 if args.smoke else args.eval_every
    out = args.out or (
        Path("/tmp/frontier-convergence-smoke.json") if args.smoke else RESULTS / "frontier-convergence.json"
    )
    png = args.plot or out.with_suffix(".png")
    runs = [r for r in RUNS if not args.only or r.name in args.only]
    missing = sorted({r.name for r in runs if any(getattr(ft, n, None) is None for n in r.needs)})
    runs = [r for r in runs if r.name not in missing]
    previous = json.loads(out.read_text()) if args.merge and out.exists() else None
    command = " ".join(["benchmarks/frontier_convergence.py", *(argv if argv is not None else sys.argv[1:])])
    this = {
        "command": command,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_start": os.getloadavg()[0],
    }
    results: dict = previous or {"smoke": args.smoke, "invocations": [], "models": {}}
    results["invocations"].append(this)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        task = tasks(args.smoke)[name]
        n_params = sum(p.numel() for p in task.make_model().parameters())
        model_out = results["models"].setdefault(name, {"runs": {}})
        model_out.update(description=task.description, steps=steps[name], floor=task.floor, n_params=n_params)
        print(f"{name}: {task.description}; {n_params:,} parameters; {steps[name]} steps"
              + (f"; loss floor {task.floor:.3f}" if task.floor is not None else ""), flush=True)  # fmt: skip
        for run in runs:
            r = train(task, run, steps[name], eval_every)
            model_out["runs"][run.name] = r
            acc = r["final_held_out_accuracy"]
            print(f"  {run.name:28s} lr {r['peak_lr']:<7g} held-out loss {r['final_held_out_loss']:.4f}"
                  + (f" acc {acc:.3f}" if acc is not None else "")
                  + f"  {r['step_ms_median']:.1f} ms/step (median), {r['wall_clock_s']:.1f} s", flush=True)  # fmt: skip
            out.write_text(json.dumps(results, indent=1) + "\n")  # after every run: a long run keeps what it did
    done = {r for m in results["models"].values() for r in m["runs"]}
    results["skipped_missing"] = sorted(set(missing) - done)
    this["load_average_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(results, indent=1) + "\n")
    if not plot(results, png):
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(f"wrote {out} and {png}")
    return results


if __name__ == "__main__":
    main()
