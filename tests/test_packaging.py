"""Packaging: the project's own metadata builds without a setuptools deprecation warning."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "kernels", "stores", "workflows")


def test_metadata_builds_without_deprecation_warnings(tmp_path, monkeypatch):
    """What `pip install -e .` runs first (PEP 517 metadata), on a copy so the tree stays clean."""
    build_meta = pytest.importorskip("setuptools.build_meta")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").touch()
    (tmp_path / "meta").mkdir()
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist_info = build_meta.prepare_metadata_for_build_wheel("meta")
    messages = [f"{w.category.__name__}: {w.message}" for w in caught if "Deprecat" in w.category.__name__]
    assert messages == []
    metadata = (tmp_path / "meta" / dist_info / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    for extra in ("tensorboard", "mlflow", "wandb", "trackers"):
        assert f"Provides-Extra: {extra}" in metadata
