"""The user documentation in docs/ and the README: worked examples run, shown files are the files,
nothing outside the repository is cited, and links resolve to pages and headings.

Each operator page's ```python blocks are concatenated in order and run with ``exec`` in a fresh
namespace, in a fresh interpreter (pages may set environment variables or start a one-process
torch.distributed group), with the chip and HCCL settings of a clean environment.  A block preceded
by ``<!-- file: PATH -->`` shows a repository file (an example run elsewhere: by the tests, CI or
torchrun) and must be that file exactly; it is not run.  Guide pages need no worked example.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCK = re.compile(r"^(?:<!-- file: (\S+) -->\n)?```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
GUIDES = {"getting-started.md", "testing.md", "debugging.md", "performance.md", "several-machines.md",
          "architecture.md"}
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# the code's file name is not a file on disk ("<docs/page.md>"): torch.compile reads the source file of
# the frames it traces, and would tokenize the Markdown page as Python
RUNNER = ("import sys\n"
          "src = sys.stdin.read()\n"
          "exec(compile(src, '<' + sys.argv[1] + '>', 'exec'), {'__name__': '__docs__'})\n")
CLEAN_ENV = ("EMU_SOC", "HCCL_BUFFSIZE", "HCCL_INTRA_PCIE_ENABLE", "HCCL_INTRA_ROCE_ENABLE", "EMU_WATCH",
             "EMU_TRACE", "EMU_JITTER_MS", "EMU_FAULT")


def python_blocks(page: Path) -> list[str]:
    """The blocks to run: every ```python block that does not show a file."""
    return [src for shown, src in BLOCK.findall(page.read_text(encoding="utf-8")) if not shown]


def slug(heading: str) -> str:
    """A heading's anchor as the docs site makes it (Python-Markdown's toc: lower case, punctuation
    dropped, spaces to hyphens)."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8")))}


def test_docs_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "dispatch.md", "quantisation.md", "combine.md", "special-experts.md", "elastic.md",
            "atlas-a2.md", "errors.md", "torch-npu.md"} | GUIDES <= names


@pytest.mark.parametrize("page", PAGES + [ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_files_are_the_files(page: Path):
    for shown, src in BLOCK.findall(page.read_text(encoding="utf-8")):
        if shown:
            assert src == (ROOT / shown).read_text(encoding="utf-8"), f"{page.name} shows an old {shown}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "README.md" and p.name not in GUIDES],
                         ids=lambda p: p.name)
def test_worked_examples_run(page: Path):
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no ```python worked example"
    src = "\n".join(blocks)
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(page.relative_to(ROOT))], input=src, text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=110, check=False)
    assert proc.returncode == 0, f"the examples of {page.name} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("path", sorted(p for p in DOCS.rglob("*") if p.is_file()), ids=lambda p: p.name)
def test_no_reference_outside_the_repository(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for banned in ("../shared", "shared/spec", "spec §"):
        assert banned not in text, f"{path.relative_to(ROOT)} mentions {banned!r}"


@pytest.mark.parametrize("page", PAGES + [ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path):
    """A docs page links to docs pages (and their headings) or to the web, never to a repository
    file outside docs/ (the site would not have it); the README links into docs/."""
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue                                     # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if page.parent == DOCS:
            assert DOCS in dest.parents, f"{page.name} links to {target}, outside docs/"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name} links to {target}: no such heading in {dest.name}"
