"""Shared fixtures. ``SHARED_DIR`` is ../shared beside the repo; tests that need it skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_DIR.parent / "shared"
CONFIGS_DIR = REPO_DIR / "configs"


@pytest.fixture
def tiny_config():
    from timers1.config import load_config

    return load_config(CONFIGS_DIR / "tiny.yaml")
