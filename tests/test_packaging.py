"""Packaging checks: pyproject.toml, environment.yml, CITATION.cff, CI and README agree.

These tests fail when someone adds a dependency to one of pyproject.toml and
environment.yml and not to the other, or lets the version numbers drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML comes with jupyter-book

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

ROOT = Path(__file__).resolve().parents[1]

needs_toml = pytest.mark.skipif(
    tomllib is None, reason="reading pyproject.toml needs tomllib (Python >= 3.11) or tomli"
)

# A requirement's name: everything before extras, version specifiers, markers or spaces.
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
# The same requirement may carry a different name on conda-forge; map conda -> PyPI here.
CONDA_TO_PYPI: dict[str, str] = {}


def normalise(name: str) -> str:
    """PEP 503 normalisation: lowercase, runs of ``-``, ``_`` and ``.`` become ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(req: str) -> tuple[str, str]:
    """``"jax[cuda12]>=0.4 ; python_version>'3'"`` -> ``("jax", ">=0.4")``."""
    req = req.split(";")[0].strip()
    match = _NAME.match(req)
    assert match, f"cannot read the requirement {req!r}"
    name = match.group(1)
    rest = req[match.end():]
    rest = re.sub(r"^\[[^\]]*\]", "", rest.strip())  # drop extras
    return normalise(name), rest.replace(" ", "")


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def environment() -> dict:
    with open(ROOT / "environment.yml", encoding="utf8") as f:
        return yaml.safe_load(f)


def pyproject_requirements() -> dict[str, str]:
    """Runtime dependencies plus the ``all`` extra: {normalised name: specifier}.

    A package constrained in both (numpy: a lower bound at run time, an upper bound for
    the tests) gets both constraints, runtime first, as environment.yml must list it.
    """
    project = pyproject()["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["all"])
    out: dict[str, str] = {}
    for req in reqs:
        name, spec = split_requirement(req)
        if name in out and out[name] != spec:
            assert spec not in out[name].split(","), f"{name} listed twice in pyproject.toml"
            spec = ",".join(filter(None, [out[name], spec]))
        out[name] = spec
    return out


def environment_requirements() -> dict[str, str]:
    """Everything environment.yml installs, except python, pip and kinjax itself."""
    out: dict[str, str] = {}
    for dep in environment()["dependencies"]:
        if isinstance(dep, dict):
            entries = [(entry, False) for entry in dep.get("pip", [])]
        else:
            entries = [(dep, True)]
        for entry, from_conda in entries:
            entry = str(entry).strip()
            if entry.startswith("-"):  # pip options such as "-e ."
                continue
            name, spec = split_requirement(entry)
            if from_conda:
                name = CONDA_TO_PYPI.get(name, name)
            if name in ("python", "pip"):
                continue
            assert name not in out, f"{name} listed twice in environment.yml"
            out[name] = spec
    return out


@needs_toml
def test_environment_lists_the_same_packages_as_pyproject():
    expected = set(pyproject_requirements())
    listed = set(environment_requirements())
    assert not expected - listed, (
        f"in pyproject.toml but not in environment.yml: {sorted(expected - listed)}"
    )
    assert not listed - expected, (
        f"in environment.yml but not in pyproject.toml: {sorted(listed - expected)}"
    )


@needs_toml
def test_environment_uses_the_same_version_constraints():
    expected = pyproject_requirements()
    listed = environment_requirements()
    differ = {
        name: (expected[name], listed[name])
        for name in expected.keys() & listed.keys()
        if expected[name] != listed[name]
    }
    assert not differ, f"version constraints differ (pyproject, environment.yml): {differ}"


def test_environment_installs_kinjax_and_a_supported_python():
    env = environment()
    assert env["name"] == "kinjax"
    assert env["channels"] == ["conda-forge"]
    deps = env["dependencies"]
    pythons = [d for d in deps if isinstance(d, str) and split_requirement(d)[0] == "python"]
    assert pythons, "environment.yml must pin python"
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    assert "pip" in deps, "the pip: section needs pip among the conda dependencies"
    assert pip_sections[0][-1].replace(" ", "") == "-e.", "pip: must end with '-e .'"


@needs_toml
def test_python_lower_bound_matches_requires_python():
    requires = pyproject()["project"]["requires-python"].replace(" ", "")
    python = next(
        d for d in environment()["dependencies"]
        if isinstance(d, str) and split_requirement(d)[0] == "python"
    )
    lower = split_requirement(python)[1].split(",")[0]
    assert lower == requires, f"environment.yml has python{lower}, pyproject {requires}"


@needs_toml
def test_all_extra_contains_every_other_extra():
    extras = pyproject()["project"]["optional-dependencies"]
    everything = {split_requirement(r) for r in extras["all"]}
    for extra, reqs in extras.items():
        missing = {split_requirement(r) for r in reqs} - everything
        assert not missing, f"the `all` extra lacks {sorted(missing)} from `{extra}`"


@needs_toml
def test_citation_matches_the_package():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf8"))
    project = pyproject()["project"]
    assert citation["cff-version"] == "1.2.0"
    assert citation["title"] == project["name"] == "kinjax"
    assert str(citation["version"]) == project["version"]
    assert citation["license"] == project["license"] == "MIT"
    assert citation["authors"] == [{"name": "kinjax developers"}]
    for key in ("message", "abstract", "keywords", "repository-code"):
        assert citation.get(key), f"CITATION.cff lacks {key}"


def test_citation_version_is_the_package_version():
    kinjax = pytest.importorskip("kinjax")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf8"))
    assert str(citation["version"]) == kinjax.__version__


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text(encoding="utf8")
    assert text.startswith("MIT License")
    assert "kinjax developers" in text


def test_ci_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf8")
    commands = [line.strip() for line in script.splitlines() if not line.strip().startswith("#")]
    assert "make test" in commands, ".ci/run must call `make test`"


def test_readme_gives_the_two_commands():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md has not been written yet")
    text = readme.read_text(encoding="utf8")
    assert "make test" in text
    assert "make book" in text
