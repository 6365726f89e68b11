"""Smoke runs of every example: each script runs in a subprocess with a tiny ``--steps``, writes into a
temporary folder, exits with 0 and leaves the files it promises (checkpoints, logs, PNGs).

The full default runs (accuracy, time) are measured by hand and reported in the examples' issue; here
the point is that every script still runs end to end against the current library. Where an example
prints a comparison that must hold at any length (vmap vs a lone run, functrain vs torch.optim), the
test checks the number too.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import functrain as ft

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path, launcher: list[str] | None = None, timeout: int = 600) -> str:
    """Runs ``examples/<script>`` with ``args`` in ``cwd``; returns its stdout (fails with both streams)."""
    command = [*(launcher or [sys.executable]), str(EXAMPLES / script), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    output = f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{script} exited with {result.returncode}\n{output}"
    return result.stdout


def read_png(path: Path) -> Image.Image:
    """The image at ``path``, fully decoded (fails on anything but a readable PNG)."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tensorboard_installed() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def check_mnist_outputs(out: Path, stdout: str, data: str = "digits") -> None:
    if data == "digits":
        assert "scikit-learn's 1,797 handwritten digits" in stdout  # says which data it fell back to
    checkpoints = sorted((out / "checkpoints").glob("step-*.pt"))
    assert checkpoints, "no checkpoint saved"
    records = jsonl(out / "log.jsonl")
    assert records and all("loss" in r and "step" in r for r in records)
    assert any(r["split"] == "train" and "lr" in r for r in records)
    assert json.loads((out / "config.json").read_text())["data"] == data
    if _tensorboard_installed():
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def check_mnist_evaluate(out: Path, tmp_path: Path, what: str = "held-out scikit-learn digits") -> None:
    stdout = run("mnist/evaluate.py", "--out", str(out), cwd=tmp_path)
    accuracy = float(re.search(rf"Accuracy (\d\.\d+) on 359 images \({what}\)", stdout).group(1))
    rows = [line.split() for line in stdout.splitlines() if re.fullmatch(r"\s+\d(\s+\d+){10}", line)]
    assert len(rows) == 10, "a 10x10 confusion matrix with row labels"
    counts = torch.tensor([[int(n) for n in row[1:]] for row in rows])
    assert counts.sum() == 359 and abs(counts.diag().sum().item() / 359 - accuracy) < 1e-4
    assert read_png(out / "confusion_matrix.png").mode == "RGB"


def test_mnist_train_and_evaluate(tmp_path):
    out = tmp_path / "mnist"
    stdout = run("mnist/train.py", "--steps", "4", "--no-compile", "--out", str(out), cwd=tmp_path)
    check_mnist_outputs(out, stdout)
    check_mnist_evaluate(out, tmp_path)


def write_idx(path: Path, data: torch.Tensor) -> None:
    """An uncompressed IDX file, MNIST's format: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    path.write_bytes(header + data.to(torch.uint8).contiguous().numpy().tobytes())


def test_mnist_data_dir_reads_mnist_files_through_torchvision(tmp_path):
    """``--data-dir`` goes through torchvision's MNIST reader; IDX files made from the digits stand in for it."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, split in (("train", "train"), ("t10k", "test")):
        data = ft.data.digits(split, size=28)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", data.images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", data.labels)
    out = tmp_path / "mnist"
    stdout = run("mnist/train.py", "--data-dir", str(tmp_path / "data"), "--steps", "3", "--no-compile",
                 "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert f"Data: MNIST from {tmp_path / 'data'}" in stdout
    check_mnist_outputs(out, stdout, data="mnist")
    check_mnist_evaluate(out, tmp_path, what="MNIST test set")


@pytest.mark.slow
def test_mnist_compiled_step_and_resume(tmp_path):
    """The default (compiled) path, then ``--resume`` continuing from its checkpoint."""
    out = tmp_path / "mnist"
    run("mnist/train.py", "--steps", "3", "--out", str(out), cwd=tmp_path)
    stdout = run("mnist/train.py", "--steps", "5", "--no-compile", "--resume", "--out", str(out), cwd=tmp_path)
    assert "after 5 steps" in stdout
    assert (out / "checkpoints" / "step-00000005.pt").is_file()
    assert [r["step"] for r in jsonl(out / "log.jsonl") if r["split"] == "train"][-1] == 5


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """``torchrun --nproc_per_node=2`` runs the unchanged script data-parallel (gloo on CPU)."""
    if TORCHRUN is None:
        pytest.skip("no torchrun next to this Python")
    tmp_path = tmp_path_factory.mktemp("torchrun")
    out = tmp_path / "mnist"
    stdout = run("mnist/train.py", "--steps", "3", "--no-compile", "--workers", "1", "--out", str(out),
                 cwd=tmp_path, launcher=[TORCHRUN, "--standalone", "--nproc_per_node=2"])  # fmt: skip
    return tmp_path, out, stdout


@pytest.mark.slow
def test_mnist_under_torchrun_two_processes(torchrun_run):
    _, out, stdout = torchrun_run
    assert "(2 process(es)" in stdout
    assert stdout.count("Held-out accuracy") == 1  # only rank 0 prints
    check_mnist_outputs(out, stdout)  # rank 0 wrote the checkpoint and the logs


@pytest.mark.slow
def test_mnist_evaluate_loads_a_torchrun_checkpoint(torchrun_run):
    tmp_path, out, _ = torchrun_run
    check_mnist_evaluate(out, tmp_path)  # what the ranks trained loads into one process


@pytest.mark.slow
def test_finetune_resnet18_from_a_weights_file(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # stands in for the ImageNet file
    out = tmp_path / "finetune"
    stdout = run("finetune/train.py", "--weights", str(weights), "--steps", "2", "--batch-size", "8",
                 "--image-size", "32", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert f"Weights: {weights}" in stdout
    assert "1438 training and 359 validation images, 10 classes" in stdout
    assert len(list((out / "digits-imagefolder" / "train").glob("digit_*/*.png"))) == 1438
    assert "Backbone: trained at 0.1 x" in stdout
    assert (out / "checkpoints" / "step-00000002.pt").is_file()
    assert jsonl(out / "log.jsonl")


def test_vae_writes_samples(tmp_path):
    out = tmp_path / "vae"
    stdout = run("vae/train.py", "--steps", "3", "--out", str(out), cwd=tmp_path)
    assert "Held-out negative ELBO" in stdout
    assert read_png(out / "samples.png").size == (8 * 30 + 2, 8 * 30 + 2)  # 64 28x28 images, 2px padding
    assert read_png(out / "reconstructions.png").size == (16 * 30 + 2, 4 * 30 + 2)
    records = jsonl(out / "log.jsonl")
    assert {"loss", "recon", "kl", "beta"} <= set(records[0])


def test_lr_sweep_vmapped_runs_equal_lone_runs(tmp_path):
    out = tmp_path / "sweep"
    run("lr_sweep/train.py", "--steps", "3", "--lrs", "0.001", "0.01", "0.1", "--out", str(out), cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert [r["lr"] for r in results["runs"]] == [0.001, 0.01, 0.1]
    assert results["vmap_vs_alone_max_diff"] < 1e-5  # float32: vmap batches the same arithmetic
    assert read_png(out / "loss_curves.png").mode == "RGB"


def test_maml_meta_gradients_run(tmp_path):
    out = tmp_path / "maml"
    run("maml/train.py", "--steps", "3", "--meta-batch", "2", "--out", str(out), cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())["mse_after_k_steps"]
    assert set(results) == {"0", "1", "5", "10"}
    assert all(v["maml"] > 0 and v["baseline"] > 0 for v in results.values())


def test_from_torch_optim_matches_torch(tmp_path):
    stdout = run("from_torch_optim/train.py", "--steps", "5", cwd=tmp_path)
    differences = [float(x) for x in re.findall(r"(?:parameters|statistics) (\d\.\de[-+]\d+)", stdout)]
    assert len(differences) == 4
    assert max(differences) < 1e-12  # float64: the same numbers as torch.optim + OneCycleLR


# ----------------------------------------------------------------------------- sharded GPT (torchrun)

# A GPT of 5,488 parameters; 4 steps of 8 sequences of 8 tokens; 16 sequences, so 2 steps an epoch;
# a checkpoint every 2 steps, at each epoch's end.
SHARDED_TINY = ["--steps", "4", "--save-every", "2", "--vocab", "64", "--width", "16", "--layers", "1",
                "--heads", "2", "--context", "8", "--batch-size", "8", "--train-sequences", "16"]  # fmt: skip


def run_sharded(out: Path, world: int, *args: str) -> str:
    """``examples/sharded/train.py`` at the tiny size on ``world`` ranks (one process when 1)."""
    launcher = None if world == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={world}"]
    return run("sharded/train.py", *SHARDED_TINY, "--out", str(out), *args, cwd=out.parent, launcher=launcher)


def sharded_result(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def sharded_two_ranks(tmp_path_factory):
    """The uninterrupted run on 2 ranks: its output folder and stdout."""
    if TORCHRUN is None:
        pytest.skip("no torchrun next to this Python")
    out = tmp_path_factory.mktemp("sharded") / "two"
    return out, run_sharded(out, 2)


@pytest.mark.slow
def test_sharded_gpt_on_two_ranks_equals_one_process(sharded_two_ranks, tmp_path):
    out, stdout = sharded_two_ranks
    assert "5,488 parameters, sharded over 2 rank(s)" in stdout
    assert stdout.count("Held-out loss") == 1  # only rank 0 prints
    two = sharded_result(out)
    assert two["world"] == 2 and two["step"] == 4
    assert ft.latest_checkpoint(out / "checkpoints").name == ft.checkpoint.step_file_name(4)
    run_sharded(tmp_path / "one", 1)
    one = sharded_result(tmp_path / "one")
    assert one["world"] == 1 and one["step"] == 4
    # float32: the same global batches; only the order of the sums over ranks differs
    assert abs(two["held_out_loss"] - one["held_out_loss"]) <= 1e-5 * one["held_out_loss"], (one, two)


@pytest.mark.slow
def test_sharded_gpt_saved_on_four_ranks_resumes_on_two(sharded_two_ranks, tmp_path):
    """Stopped at step 2 (an epoch's end) on 4 ranks, resumed on 2 from the DCP checkpoint, resharded:
    the same run as 2 ranks uninterrupted (a resume on another number of ranks restarts the epoch
    it was in, here the next one: the same batches)."""
    out = tmp_path / "resumed"
    run_sharded(out, 4, "--stop-at", "2")
    assert sharded_result(out)["step"] == 2
    assert len(list((out / "checkpoints" / ft.checkpoint.step_file_name(2)).glob("*.distcp"))) == 4  # a shard each
    stdout = run_sharded(out, 2, "--resume")
    assert f"Resuming from {out / 'checkpoints'}" in stdout
    resumed, uninterrupted = sharded_result(out), sharded_result(sharded_two_ranks[0])
    assert resumed["world"] == 2 and resumed["step"] == 4
    assert abs(resumed["held_out_loss"] - uninterrupted["held_out_loss"]) <= 1e-5 * uninterrupted["held_out_loss"]
