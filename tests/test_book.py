"""The book builds with warnings as errors, and its pages are all there.

``test_book_builds_with_every_chapter`` runs ``jupyter-book build . -W`` into a temporary
directory (the repository's ``_build`` is not touched), which executes every tutorial
notebook: it is slow (minutes). It is skipped while a notebook listed in ``_toc.yml`` has
not been written yet, and when jupyter-book is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".md", ".ipynb")
# A figure from a cell output: Sphinx copies output images into _build/html/_images/
# (the launch-button logos live in _static/ and do not count).
OUTPUT_IMAGE = re.compile(r'<img[^>]*\ssrc="[^"]*_images/')


def toc_files() -> list[str]:
    """Every document of ``_toc.yml`` (root first), as paths without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf8"))
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def source_of(doc: str) -> Path | None:
    for suffix in SOURCE_SUFFIXES:
        path = ROOT / f"{doc}{suffix}"
        if path.exists():
            return path
    return None


def jupyter_book() -> str | None:
    local = Path(sys.executable).parent / "jupyter-book"
    return str(local) if local.exists() else shutil.which("jupyter-book")


def test_toc_lists_existing_book_pages():
    """The hand-written pages (not the notebooks) exist and are all in the toc."""
    docs = toc_files()
    assert docs[0] == "book/intro"
    for doc in docs:
        if doc.startswith("book/"):
            assert source_of(doc) is not None, f"{doc} is in _toc.yml but has no source"
    for page in sorted((ROOT / "book").glob("*.md")):
        assert f"book/{page.stem}" in docs, f"{page.name} is not in _toc.yml"


def _committed(path: Path) -> str:
    """``path``'s text as committed (HEAD), or as on disk outside a git checkout."""
    rel = path.relative_to(ROOT).as_posix()
    proc = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{rel}"], capture_output=True)
    if proc.returncode == 0:
        return proc.stdout.decode("utf8")
    if not path.exists():
        pytest.fail(f"{rel} is missing: run `make notebooks` and commit it")
    return path.read_text(encoding="utf8")


def _without_ids(text: str) -> dict:
    """A notebook's JSON without cell ids (random per conversion; ``jupytext --update`` keeps them)."""
    import json

    nb = json.loads(text)
    for cell in nb["cells"]:
        cell.pop("id", None)
    return nb


def test_committed_notebooks_match_their_sources():
    """Each tutorial's .ipynb (what Colab opens from GitHub) is committed and is exactly the
    jupytext conversion of its MyST source, without outputs; `make notebooks` updates them."""
    jupytext = pytest.importorskip("jupytext")
    sources = sorted((ROOT / "notebooks").glob("*.md"))
    assert sources
    for md in sources:
        nb = jupytext.read(md)
        assert nb.metadata.get("accelerator") == "GPU", f"{md.name}: Colab should open it with a GPU"
        committed = _without_ids(_committed(md.with_suffix(".ipynb")))
        assert not any(c.get("outputs") for c in committed["cells"]), f"{md.stem}.ipynb is committed with outputs"
        assert committed == _without_ids(jupytext.writes(nb, fmt="ipynb")), (
            f"{md.stem}.ipynb is not the conversion of {md.name}: run `make notebooks` and commit it")


def test_book_builds_with_every_chapter(tmp_path):
    docs = toc_files()
    missing = [doc for doc in docs if source_of(doc) is None]
    if missing:
        pytest.skip(f"not written yet: {', '.join(missing)}")
    exe = jupyter_book()
    if exe is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[book]')")

    # Jupyter-cache and the executed notebooks go under --path-output as well. kinjax is
    # put on the path so that autodoc and the notebooks import this checkout's code even
    # where it has not been pip-installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [exe, "build", str(ROOT), "--path-output", str(tmp_path), "-W", "--keep-going"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (
        f"jupyter-book build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )

    html = tmp_path / "_build" / "html"
    for doc in docs:
        page = html / f"{doc}.html"
        assert page.exists(), f"no page for {doc}"
        if doc.startswith("notebooks/"):
            text = page.read_text(encoding="utf8")
            assert OUTPUT_IMAGE.search(text), f"{doc} shows no figure"
            colab = f"https://colab.research.google.com/github/kinjax/kinjax/blob/main/{doc}.ipynb"
            assert colab in text, f"{doc}: no Colab button for the committed .ipynb"

    api = (html / "book" / "api.html").read_text(encoding="utf8")
    assert 'id="module-kinjax.losvd"' in api, "the API page does not document kinjax.losvd"
