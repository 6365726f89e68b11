"""The docs site: its code runs, its API reference covers every public name, and it builds strictly.

- Every ```python block in docs/**/*.md runs. The blocks of one page run in order in one namespace
  (a page reads as a tutorial: later blocks use what earlier ones defined). A block preceded by an
  ``<!-- no-test -->`` line is skipped; keep that for code that cannot run here (e.g. CUDA only).
- Every public name (``functrain.__all__``, the public names of ``functrain.transforms``,
  ``functrain.schedules.__all__``) is rendered by a ``::: path`` entry of a docs/api/*.md page the
  site builds (not in mkdocs.yml's ``exclude_docs``), either itself or as a member of a module
  entry that renders its members.
- ``mkdocs build --strict`` succeeds and every ``::: path`` entry produced its heading (skipped when
  mkdocs, mkdocs-material or mkdocstrings-python is not installed: they are in the ``docs`` extra).
"""

from __future__ import annotations

import html
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

import functrain

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
PAGES = sorted(DOCS.rglob("*.md"))

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_SKIP = "<!-- no-test -->"
# `::: functrain.x` and, indented below it, mkdocstrings' `options:` (only `members:` matters here).
_ENTRY = re.compile(r"^::: *(?P<path>[\w.]+)[ \t]*\n(?P<options>(?:[ \t]+\S.*\n?)*)", re.M)


def python_blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of each python block of ``page`` that is not marked ``no-test``."""
    text = page.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        if before and before[-1].strip() == _SKIP:
            continue
        blocks.append((text.count("\n", 0, match.start()) + 2, match[1]))
    return blocks


def test_docs_have_code_to_run():
    assert PAGES, "docs/ has no pages"
    assert sum(len(python_blocks(page)) for page in PAGES) >= 20, "the docs' examples went missing"


def run_page(page: pathlib.Path) -> None:
    """Runs the page's blocks in order in one module namespace. The module is importable while it
    runs, so that classes it defines pickle (``torch.save`` of a state class defined on the page)."""
    torch.manual_seed(0)
    module = types.ModuleType(f"functrain_docs_{page.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module
    try:
        for line, code in python_blocks(page):
            # Padding keeps the traceback's line numbers those of the .md file.
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]


def _page_param(page: pathlib.Path):
    # Pages that compile a step take 10-30 s on a small CPU; mark them so the cost is visible.
    compiles = any("compile=True" in code or "torch.compile(" in code for _, code in python_blocks(page))
    return pytest.param(page, id=str(page.relative_to(DOCS)), marks=[pytest.mark.slow] if compiles else [])


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES if python_blocks(p)])
def test_python_blocks_run(page):
    run_page(page)


# ----------------------------------------------------------------------------- API coverage


def excluded_pages() -> set[pathlib.Path]:
    """The pages mkdocs.yml's ``exclude_docs`` leaves out of the site (gitignore-style lines)."""
    match = re.search(r"^exclude_docs: *\|\n((?:[ \t]+.*\n?)*)", (ROOT / "mkdocs.yml").read_text(), re.M)
    lines = [line.strip() for line in (match[1] if match else "").splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    return {page for page in DOCS.rglob("*.md") for p in patterns if page.relative_to(DOCS).match(p.rstrip("/"))}


def api_pages() -> list[pathlib.Path]:
    return [page for page in sorted(API.glob("*.md")) if page not in excluded_pages()]


def api_entries() -> list[tuple[str, str]]:
    """``(dotted path, options text)`` of every ``:::`` entry in the API pages the site builds."""
    return [(m["path"], m["options"]) for page in api_pages() for m in _ENTRY.finditer(page.read_text())]


def resolve(path: str):
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def rendered_members(obj, options: str) -> list[str]:
    """The members mkdocstrings renders under a module entry: none with ``members: false``, the listed
    ones with ``members: [a, b]``, else the module's ``__all__``, else the public functions and
    classes the module defines itself (names it imports are rendered only when ``__all__`` lists them)."""
    if not isinstance(obj, types.ModuleType):
        return []
    listed = re.search(r"^\s*members:\s*(.*)$", options, re.M)
    if listed:
        value = listed[1].strip()
        if value.lower() == "false":
            return []
        if value.startswith("["):
            return [name.strip() for name in value.strip("[]").split(",") if name.strip()]
    if hasattr(obj, "__all__"):
        return list(obj.__all__)
    return [
        name
        for name, member in vars(obj).items()
        if not name.startswith("_")
        and (inspect.isfunction(member) or inspect.isclass(member))
        and member.__module__ == obj.__name__
    ]


def public_names() -> list[tuple[str, object]]:
    transforms = functrain.transforms
    names = [(f"functrain.{n}", getattr(functrain, n)) for n in functrain.__all__]
    names += [
        (f"functrain.transforms.{n}", getattr(transforms, n))
        for n in dir(transforms)
        if not n.startswith("_") and not inspect.ismodule(getattr(transforms, n))
    ]
    names += [(f"functrain.schedules.{n}", getattr(functrain.schedules, n)) for n in functrain.schedules.__all__]
    return names


def documented() -> list[tuple[str, object]]:
    """``(path, object)`` for every object the API pages render."""
    objects = []
    for path, options in api_entries():
        obj = resolve(path)
        objects.append((path, obj))
        objects += [(f"{path}.{member}", getattr(obj, member)) for member in rendered_members(obj, options)]
    return objects


def _defined_here(obj) -> bool:
    """A function, class or module of functrain's own: one object, whatever name re-exports it.
    (Type aliases such as ``Params = Any`` are shared objects, matched by their path instead.)"""
    home = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
    return isinstance(home, str) and home.split(".")[0] == "functrain"


def test_every_public_name_is_in_the_api_reference():
    done = documented()
    paths, objects = {path for path, _ in done}, {id(obj) for _, obj in done}
    missing = [
        path for path, obj in public_names() if path not in paths and not (_defined_here(obj) and id(obj) in objects)
    ]
    assert not missing, f"public names missing from docs/api/*.md (add a `::: name` entry): {missing}"


def test_api_entries_resolve():
    for path, _ in api_entries():
        resolve(path)


# ----------------------------------------------------------------------------- the site


def test_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(
            module, reason="the docs extra (mkdocs, mkdocs-material, mkdocstrings-python) is not installed"
        )
    site = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    built = "\n".join(html.unescape(p.read_text()) for p in (site / "api").rglob("*.html"))
    headings = set(re.findall(r'id="(functrain[\w.]*)"', built))
    expected = [path for path, options in api_entries()]
    expected += [f"{path}.{m}" for path, options in api_entries() for m in rendered_members(resolve(path), options)]
    not_rendered = [path for path in expected if path not in headings]
    assert not not_rendered, f"::: entries that rendered no heading: {not_rendered}"
    # The docstrings' reST spellings were rewritten (docs/_griffe/rst_markup.py), not shown raw.
    for raw in (":math:`", ".. math::", ":func:`", "Example:</p>"):
        assert raw not in built, f"{raw!r} reached the built API pages"
