"""torch's "No CUDA runtime is found" notice: a compiled functrain step on a machine with a CUDA
toolkit but no CUDA device does not print it; torch still does elsewhere, and every other record
of its logger still shows.

Each check runs in a fresh interpreter (the notice is logged once per process, when
``torch.utils.cpp_extension`` is first imported), with ``CUDA_HOME`` pointing at an empty folder so
that torch finds a toolkit whatever this machine has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="torch logs the notice only without a CUDA device")

NOTICE = "No CUDA runtime is found"

BUILD_A_COMPILED_STEP = """
import torch, functrain as ft
model = torch.nn.Linear(3, 2)
tx = ft.sgd(lr=0.1)
step = ft.make_train_step(model, lambda m, b: ((m(b) ** 2).mean(), {}), tx, compile=True)
"""


def run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def test_torch_alone_logs_the_notice_at_the_import(tmp_path):
    """The control: without functrain, the same import prints it (so the test below can fail)."""
    result = run_python("import torch.utils.cpp_extension", tmp_path)
    assert result.returncode == 0, result.stderr
    assert NOTICE in result.stderr


def test_a_compiled_step_imports_it_quietly_and_leaves_the_logger_as_it_was(tmp_path):
    result = run_python(
        BUILD_A_COMPILED_STEP
        + """
import logging, sys
assert "torch.utils.cpp_extension" in sys.modules
logger = logging.getLogger("torch.utils.cpp_extension")
assert logger.filters == [], logger.filters
logger.warning("another record of that logger")
print("built")
""",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "built" in result.stdout
    assert NOTICE not in result.stderr
    assert "another record of that logger" in result.stderr


def test_an_eager_step_imports_nothing(tmp_path):
    result = run_python(
        BUILD_A_COMPILED_STEP.replace("compile=True", "compile=False")
        + 'import sys; print("torch.utils.cpp_extension" in sys.modules)',
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
