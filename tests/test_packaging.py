"""Packaging: one import name (`babydistill`), nothing in the repo root that shadows an installed package,
a wheel with `babydistill/` alone, a working console script from an editable and a wheel install, the lock."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "kernels", "stores", "workflows")
sys.path.insert(0, str(ROOT / "tools"))
import lockfile  # noqa: E402


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def package_folders() -> list[Path]:
    """The folder of every package pyproject.toml lists (``babydistill.pipeline.training`` -> pipeline/training)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = []
    for package in setuptools["packages"]:
        top = ".".join(package.split(".")[:2])
        folders.append(Path(setuptools["package-dir"][top], *package.split(".")[2:]))
    return folders


def test_metadata_builds_without_deprecation_warnings(tmp_path, monkeypatch):
    """What `pip install -e .` runs first (PEP 517 metadata), on a copy so the tree stays clean."""
    build_meta = pytest.importorskip("setuptools.build_meta")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in package_folders():
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "module.py").touch()
    (tmp_path / "meta").mkdir()
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist_info = build_meta.prepare_metadata_for_build_wheel("meta")
    messages = [f"{w.category.__name__}: {w.message}" for w in caught if "Deprecat" in w.category.__name__]
    assert messages == []
    metadata = (tmp_path / "meta" / dist_info / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert "Requires-Python: >=3.11" in metadata
    for extra in ("tensorboard", "mlflow", "wandb", "trackers"):
        assert f"Provides-Extra: {extra}" in metadata


def test_the_four_folders_are_namespace_portions_so_they_never_shadow_an_installed_package():
    """A folder with __init__.py in the working directory wins over site-packages (the bug of transformers
    5.25 and Hugging Face's `kernels`); a folder without one yields to any installed regular package."""
    for folder in FOLDERS:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py makes `{folder}` shadowable"
    assert not (ROOT / "__init__.py").exists() and not (ROOT / "babydistill").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of what the build reads (setuptools writes build/ beside the sources)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in (*FOLDERS, "tests", "docs"):  # tests and docs too: the build must leave them out
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                  str(source)], cwd=out)
    assert build.returncode == 0, build.stderr[-3000:]
    return next(out.glob("babydistill-*.whl"))


def test_the_wheel_holds_babydistill_alone_and_no_tests_or_docs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"babydistill"}, top
    for folder in FOLDERS:
        assert any(n.startswith(f"babydistill/{folder}/") for n in names), folder
    assert "babydistill/kernels/triton_kernel.py" in names and "babydistill/workflows/cli.py" in names
    assert not [n for n in names if n.startswith(("babydistill/tests", "tests/", "docs/", "babydistill/docs"))]
    assert not [n for n in names if "/__init__.py" in n], "the folders are namespace portions (see README)"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "babydistill = babydistill.workflows.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_wheel_install_gives_a_working_console_script(wheel, tmp_path):
    """Installed into its own folder (the test's environment supplies the dependencies), from a directory
    that is not the repo: `babydistill --help` runs from the wheel's files, not the checkout's."""
    target = tmp_path / "site"
    install = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = _run([sys.executable, "-c", "import babydistill.workflows.cli as c; print(c.__file__)"], tmp_path, env)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    helped = _run([sys.executable, str(target / "bin" / "babydistill"), "--help"], tmp_path, env)
    assert helped.returncode == 0 and "usage: babydistill" in helped.stdout, helped.stderr[-2000:]


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_editable_console_script_and_module_run_from_the_root_and_elsewhere(cwd, tmp_path):
    where = ROOT if cwd == "root" else tmp_path
    script = Path(sys.executable).with_name("babydistill")
    if not script.exists():
        pytest.skip("no babydistill console script beside this interpreter (not installed with pip install -e .)")
    for args in ([str(script), "--help"], [sys.executable, "-m", "babydistill.workflows", "--help"]):
        done = _run(args, where)
        assert done.returncode == 0 and "usage: babydistill" in done.stdout, done.stderr[-2000:]


def _kernels_distribution(tmp_path) -> dict:
    """The environment for a subprocess that has a `kernels` distribution: the installed one (transformers 5.25
    depends on Hugging Face's), or a stand-in regular package on PYTHONPATH where none is installed."""
    if importlib.util.find_spec("kernels") is not None:
        return dict(os.environ)
    fake = tmp_path / "fake-site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("HUGGING_FACE_KERNELS = True\n")
    return {**os.environ, "PYTHONPATH": str(fake.parent)}


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_with_a_kernels_distribution_present_transformers_and_babydistill_kernels_both_load(cwd, tmp_path):
    """`python -c` puts the working directory first on sys.path, as a notebook at the repo root does."""
    env = _kernels_distribution(tmp_path)
    code = ("import kernels, os; assert getattr(kernels, '__file__', None), 'kernels is a namespace: ' + "
            "repr(list(kernels.__path__)); ours = os.path.realpath(os.path.join(os.environ['REPO'], 'kernels')); "
            "assert not os.path.realpath(kernels.__file__).startswith(ours + os.sep), kernels.__file__; "
            "from transformers import LlamaForCausalLM; "
            "from babydistill.kernels.losses import sparse_distill_loss; print('ok', kernels.__file__)")
    done = _run([sys.executable, "-c", code], ROOT if cwd == "root" else tmp_path, {**env, "REPO": str(ROOT)})
    assert done.returncode == 0 and done.stdout.startswith("ok "), done.stderr[-3000:]


def test_plain_pytest_from_the_root_collects_with_the_repo_first_on_the_path(tmp_path):
    """`pytest` (not `python -m pytest`) and `python -m pytest` both collect a test file that imports transformers'
    Llama and babydistill.kernels (the failure of 2026-12-05 was 13 collection errors)."""
    probe = ROOT / "tests" / f"_probe_{os.getpid()}_test.py"
    probe.write_text("from transformers import LlamaForCausalLM  # noqa: F401\n"
                     "from babydistill.kernels.losses import sparse_distill_loss  # noqa: F401\n\n"
                     "def test_probe():\n    pass\n")
    try:
        pytest_script = Path(sys.executable).with_name("pytest")
        for args in ([sys.executable, "-m", "pytest"], [str(pytest_script)]):
            done = _run([*args, "-q", "-p", "no:cacheprovider", str(probe)], ROOT, _kernels_distribution(tmp_path))
            assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    finally:
        probe.unlink()


# --- the lock -------------------------------------------------------------------------------------------------

_UV_OUTPUT = """\
# This file was autogenerated by uv via the following command:
#    uv pip compile pyproject.toml --universal -o raw.txt
cuda-bindings==13.5.0 ; sys_platform == 'linux'
    # via torch
cuda-pathfinder==1.9.1 ; sys_platform == 'linux'
    # via cuda-bindings
nvidia-cublas==13.1.1.3 ; sys_platform == 'linux'
    # via
    #   cuda-toolkit
    #   nvidia-cudnn-cu13
only-for-cuda==1.0
    # via nvidia-cublas
sympy==1.14.0
    # via torch
torch==2.13.0
    # via
    #   -c torch-pin.txt
    #   babydistill (pyproject.toml)
transformers==5.25.0
    # via babydistill (pyproject.toml)
triton==3.7.1 ; sys_platform == 'linux'
    # via
    #   babydistill (pyproject.toml)
    #   torch
"""


def test_the_lock_filter_leaves_out_torch_triton_and_the_cuda_stack_and_keeps_torchs_pure_dependencies(tmp_path):
    raw, out = tmp_path / "raw.txt", tmp_path / "requirements.lock"
    raw.write_text(_UV_OUTPUT)
    assert lockfile.filter_lock(raw, out) == 0
    pins = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    assert pins == ["sympy==1.14.0", "transformers==5.25.0"]


def test_the_committed_lock_pins_every_dependency_exactly_and_leaves_torch_and_triton_to_the_user():
    pins = lockfile.read_lock(ROOT / "requirements.lock")
    assert "torch" not in pins and "triton" not in pins and not [p for p in pins if p.startswith("nvidia-")]
    for name in ("transformers", "tokenizers", "zarr", "numcodecs", "dask", "optuna", "pytest", "ruff",
                 "tensorboard", "mlflow-skinny", "wandb"):
        assert name in pins, f"{name} is not in requirements.lock: run make lock"


def test_the_lock_check_names_what_differs_in_one_line(tmp_path, capsys):
    lock = tmp_path / "requirements.lock"
    installed = metadata.version("pytest")
    lock.write_text(f"pytest=={installed}\nnot-a-package-here==1.0\npytest-timeout==0.0.1 ; sys_platform == 'nope'\n")
    assert lockfile.check(lock) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "not-a-package-here missing (lock: 1.0)" in err and "reinstalling from the lock" in err
    assert "pytest " not in err.split("differs from")[1] and "pytest-timeout" not in err
    lock.write_text(f"pytest=={installed}\n")
    assert lockfile.check(lock) == 0


def test_the_installed_environment_matches_the_lock():
    """`make test` runs against the lock's versions (skipped when the suite runs in another environment)."""
    if not (Path(sys.prefix) / ".installed").exists():
        pytest.skip("not the .venv that make installs")
    assert lockfile.differences(ROOT / "requirements.lock") == []


def test_an_old_python_or_one_without_venv_gets_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    assert lockfile.python_ok() == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs Python >= 3.11" in err
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "ensurepip", None)  # import ensurepip now raises ImportError
    assert lockfile.python_ok() == 2
    assert "without the venv module" in capsys.readouterr().err
