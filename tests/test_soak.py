"""Soak: a training run killed again and again, with SIGKILL and SIGINT, at seeded points across its steps, its
saves and its logs, each time resumed by a new process; every checkpoint left behind loads, and every resume
continues bitwise as the uninterrupted run.

The harness is test_checkpoint.py's (a training process that dies at a chosen point, inside a save through hooks
on ``torch.save``, ``os.fsync``, ``os.replace`` and ``os.unlink``), driven many times. To fit ~20 kills into
about a minute on two cores, a driver process imports torch and functrain once and forks one child per run;
a child builds everything afresh, resumes from the directory and trains until its kill. The driver only
imports and reads checkpoints between forks, with one intra-op thread, so a child inherits no training state.

Run it alone: ``python -m tests.test_soak [seed]`` prints the counts.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH, EPOCHS = 5, 5
LAST_STEP = STEPS_PER_EPOCH * EPOCHS
SIGINT_EXIT = 130  # a child stopped by KeyboardInterrupt exits with this code, as a shell reports SIGINT

# Where a run dies. "save-*" phases act inside the nth save at that step (every step saves once; an epoch's last
# step saves again at the epoch end): before anything is written, with a seeded fraction of the file written,
# before the file's fsync, before and after the rename into place. "prune": deleting the oldest checkpoint.
# "in-step": inside the train step. "epoch-gap": after an epoch's end-of-epoch log and evaluation, before its
# save. "jsonl": half-way through writing a JSONL record. "after-step": between steps, after the step's save.
SAVE_PHASES = ("save-open", "save-write", "save-fsync", "save-rename", "save-renamed")
PHASES = (*SAVE_PHASES, "prune", "in-step", "epoch-gap", "jsonl", "after-step")
SIGINT_PHASES = ("save-write", "save-rename", "in-step", "epoch-gap", "jsonl", "after-step")  # Python code runs


@dataclass(frozen=True)
class Kill:
    step: int
    phase: str
    signal: int
    nth: int = 1  # which save at that step
    fraction: float = 0.5  # of the file written, for "save-write"


def kill_plan(seed: int, sigints: int) -> list[Kill]:
    """Every phase once, in a random order at random increasing steps (so each resumed run reaches the next kill),
    ``sigints`` of them SIGINT, with random save fractions and, at an epoch's end, either of its two saves; all
    drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    while True:
        phases, steps, step = rng.sample(PHASES, len(PHASES)), [], 0
        for placed, phase in enumerate(phases):
            last = LAST_STEP - (len(phases) - placed - 1)  # room for the kills after this one
            options = [s for s in range(step + 1, last + 1) if _fits(phase, s)]
            if not options:
                break
            step = rng.choice(options[:4])
            steps.append(step)
        else:
            break  # every phase placed; else draw another order
    plan = []
    for phase, step in zip(phases, steps):
        nth = rng.choice((1, 2)) if phase in SAVE_PHASES and step % STEPS_PER_EPOCH == 0 else 1
        plan.append(Kill(step, phase, signal.SIGKILL, nth, round(rng.uniform(0.05, 0.95), 3)))
    eligible = [i for i, kill in enumerate(plan) if kill.phase in SIGINT_PHASES]
    for i in rng.sample(eligible, sigints):
        plan[i] = Kill(plan[i].step, plan[i].phase, signal.SIGINT, plan[i].nth, plan[i].fraction)
    return plan


def _fits(phase: str, step: int) -> bool:
    if phase == "epoch-gap":
        return step % STEPS_PER_EPOCH == 0
    if phase == "jsonl":  # a step that logs: every 2 steps, and at an epoch's end
        return step % 2 == 0 or step % STEPS_PER_EPOCH == 0
    return phase != "prune" or step >= 3  # keep=2: the third save deletes the first


# ----------------------------------------------------------------------------- the child: train until the kill


def child(directory: Path, loader_kind: str, kill: Kill | None, keep: int) -> None:
    """One training process: resumes from ``directory`` if it holds a checkpoint, trains 5 epochs of 5 steps
    (dropout, BatchNorm, AdamW, evaluation every epoch, logs every 2 steps, a checkpoint every step and at each
    epoch end), and dies at ``kill``; without one, saves its final state and history to ``result.pt``."""
    import torch

    import functrain as ft
    from tests.test_loop import make_data, make_problem

    real_save = torch.save
    now = {"step": 0, "saves": 0, "in_save": False}  # the loop's step; saves so far at that step

    def due(phase: str) -> bool:
        return kill is not None and kill.phase == phase and now["step"] == kill.step and now["saves"] == kill.nth

    def die() -> None:
        os.kill(os.getpid(), kill.signal)  # SIGINT: KeyboardInterrupt at the next bytecode

    def save(obj, file, *args, **kwargs):
        now["saves"], now["in_save"] = now["saves"] + 1, True
        if due("save-open"):
            die()
        if due("save-write"):
            import io

            buffer = io.BytesIO()
            real_save(obj, buffer)
            file.write(buffer.getvalue()[: int(len(buffer.getvalue()) * kill.fraction)])
            getattr(file, "flush", lambda: None)()
            die()
        real_save(obj, file, *args, **kwargs)

    def hooked(name: str, before: str | None = None, after: str | None = None):
        real = getattr(os, name)

        def call(*args, **kwargs):
            if now["in_save"] and before and due(before):
                die()
            result = real(*args, **kwargs)
            if now["in_save"] and after and due(after):
                die()
            if name == "replace":
                now["in_save"] = False
            return result

        return call

    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if re.fullmatch(r"step-\d+\.pt", Path(path).name) and due("prune"):
            die()
        return real_unlink(path, *args, **kwargs)

    torch.save, os.unlink = save, unlink
    os.fsync = hooked("fsync", before="save-fsync")
    os.replace = hooked("replace", before="save-rename", after="save-renamed")

    class Track(ft.Callback):  # first: the step is known before the Checkpoint's save in the same event
        def on_fit_start(self, loop):
            now["step"] = loop.step

        def on_step_end(self, loop):
            now["step"], now["saves"] = loop.step, 0

    class KillAt(ft.Callback):
        def __init__(self, phase):
            self.phase = phase

        def on_step_end(self, loop):
            if (
                self.phase == "after-step"
                and kill is not None
                and kill.phase == "after-step"
                and loop.step == kill.step
            ):
                die()

        def on_epoch_end(self, loop):
            if self.phase == "epoch-gap" == getattr(kill, "phase", None) and loop.step == kill.step:
                die()

    class TornJSONLogger(ft.callbacks.JSONLogger):
        def on_log(self, loop):
            if kill is not None and kill.phase == "jsonl" and loop.step == kill.step:
                with self.path.open("a") as file:
                    line = json.dumps({"split": "train", **loop.logs})
                    file.write(line[: len(line) // 2])
                die()
            super().on_log(loop)

    _, step, evaluate, state, loader = make_problem()
    if loader_kind == "list":
        x, y = make_data()
        loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]

    def train_step(state, batch):
        if kill is not None and kill.phase == "in-step" and now["step"] + 1 == kill.step:
            die()
        return step(state, batch)

    torch.manual_seed(0)
    checkpoint = ft.callbacks.Checkpoint(directory / "ckpt", every_steps=1, every_epochs=1, keep=keep)
    callbacks = [
        Track(),
        TornJSONLogger(directory / "log.jsonl"),
        KillAt("epoch-gap"),
        checkpoint,
        KillAt("after-step"),
    ]
    state, history = ft.fit(
        train_step, state, loader, epochs=EPOCHS, eval_step=evaluate, eval_loader=[make_data(n=8, seed=5)],
        log_every=2, callbacks=callbacks, resume=True, device="cpu",
    )  # fmt: skip
    if kill is not None:
        raise AssertionError(f"the run ended without reaching its kill point {kill}")
    real_save({"state": state, "history": history}, directory / "result.pt")


def run_child(directory: Path, loader_kind: str, kill: Kill | None, keep: int) -> int:
    """Forks a child running :func:`child`; returns its wait status decoded: -signal, or its exit code."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(directory, loader_kind, kill, keep)
        except KeyboardInterrupt:
            code = SIGINT_EXIT
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# ----------------------------------------------------------------------------- the driver: kill, check, resume


def soak(workdir: Path, loader_kind: str, plan: list[Kill]) -> dict:
    """Runs the uninterrupted reference and the killed chain; returns the counts."""
    import torch

    import functrain as ft
    from tests.test_loop import make_problem

    like = make_problem()[3]

    def states(directory: Path) -> tuple[dict[int, object], list[str]]:
        """Every periodic checkpoint's state by step, and the names of the files that do not load."""
        loaded, corrupt = {}, []
        for path in sorted((directory / "ckpt").glob("*.pt")):
            try:
                state, progress = ft.load_checkpoint(path, like=like, loader=None, restore_rng=False)
            except Exception as error:  # noqa: BLE001 - any failure to load is what is counted
                corrupt.append(f"{path.name}: {error}")
                continue
            loaded[progress["step"]] = state
        return loaded, corrupt

    def bitwise(a, b) -> bool:
        from functrain import _tree

        return all(torch.equal(x, y) for x, y in zip(_tree.leaves(a), _tree.leaves(b), strict=True))

    reference_dir, chain_dir = workdir / "reference", workdir / "chain"
    assert run_child(reference_dir, loader_kind, None, keep=1000) == 0, "the uninterrupted run failed"
    reference, corrupt = states(reference_dir)
    assert not corrupt and sorted(reference) == list(range(1, LAST_STEP + 1)), (corrupt, sorted(reference))

    corrupted, resumes, bitwise_resumes, mismatches = [], 0, 0, []
    for index, kill in enumerate([*plan, None]):
        code = run_child(chain_dir, loader_kind, kill, keep=2)
        expected = 0 if kill is None else (-signal.SIGKILL if kill.signal == signal.SIGKILL else SIGINT_EXIT)
        assert code == expected, f"run {index} ({kill}) ended with {code}, expected {expected}"
        saved, corrupt = states(chain_dir)
        corrupted += corrupt
        assert kill is None or kill.step == 1 or saved, f"no checkpoint after {kill}"
        wrong = [step for step, state in saved.items() if not bitwise(state, reference[step])]
        if kill is None:
            result = torch.load(chain_dir / "result.pt", weights_only=True)
            expected_result = torch.load(reference_dir / "result.pt", weights_only=True)
            wrong += [] if bitwise(result["state"], expected_result["state"]) else ["final state"]
            wrong += [] if result["history"] == expected_result["history"] else ["history"]
        mismatches += [f"run {index}: {w}" for w in wrong]
        if index > 0:  # this run resumed after a kill
            resumes += 1
            bitwise_resumes += not wrong
    reference_log = (reference_dir / "log.jsonl").read_text()
    return {
        "loader": loader_kind,
        "kills": len(plan),
        "sigkills": sum(k.signal == signal.SIGKILL for k in plan),
        "sigints": sum(k.signal == signal.SIGINT for k in plan),
        "kills_in_saves": sum(k.phase in SAVE_PHASES or k.phase == "prune" for k in plan),
        "corrupted_checkpoints": len(corrupted),
        "corrupted": corrupted,
        "resumes": resumes,
        "bitwise_resumes": bitwise_resumes,
        "mismatches": mismatches,
        "jsonl_equal": (chain_dir / "log.jsonl").read_text() == reference_log,
        "plan": [asdict(k) for k in plan],
    }


def main(workdir: Path, seed: int, sigints: int = 3) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # no OpenMP pool in the driver: forking it is safe
    counts = []
    for offset, loader_kind in enumerate(("position", "list")):  # a loader that saves its position; a list
        plan = kill_plan(seed + offset, sigints)
        counts.append(soak(workdir / loader_kind, loader_kind, plan))
    return counts


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the soak forks its training processes (POSIX)")
def test_soak_kills_leave_no_corrupt_checkpoint_and_every_resume_is_bitwise(tmp_path):
    """20 kills over two chains (a loader that saves its position; a list of batches, skipped to its position):
    in each, every phase once, SIGKILL or SIGINT, at seeded steps: inside the saves (before writing, mid-write,
    before the fsync, before and after the rename, while deleting old checkpoints), inside a step, between steps,
    between an epoch's log and its save, half-way through a JSONL record. After each: every checkpoint file
    present loads; each resumed run's checkpoints, final state and history are bitwise the uninterrupted run's;
    the JSONL log ends equal to the uninterrupted run's."""
    args = [sys.executable, "-m", "tests.test_soak", str(tmp_path), "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    counts = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for c in counts:
        print({k: v for k, v in c.items() if k not in ("plan", "corrupted", "mismatches")})
    assert [c["loader"] for c in counts] == ["position", "list"]
    assert any(k["signal"] == signal.SIGINT and k["phase"] in SAVE_PHASES for c in counts for k in c["plan"])
    for c in counts:
        assert sorted(kill["phase"] for kill in c["plan"]) == sorted(PHASES)
        assert c["kills"] == 10 and c["sigints"] == 3
        assert c["corrupted_checkpoints"] == 0, c["corrupted"]
        assert c["bitwise_resumes"] == c["resumes"] == c["kills"], c["mismatches"]
        assert c["jsonl_equal"]


if __name__ == "__main__":
    workdir, seed = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for count in main(workdir, seed):
        summary = {k: v for k, v in count.items() if k not in ("plan", "corrupted", "mismatches")}
        print(f"# {summary}", file=sys.stderr)
        print(json.dumps(count))
