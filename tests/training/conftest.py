"""Tiny real data and a tiny recipe for the training parts (digits, seconds per test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtemperate.data import DataBundle, RunLoaders, build_datasets, build_run_loaders
from qtemperate.recipe import Recipe, parse_recipe
from tests.pipeline_helpers import tiny_recipe


@pytest.fixture(scope="module")
def digits_bundle() -> DataBundle:
    return build_datasets("digits", limit_train=512, limit_test=256, seed=0)


@pytest.fixture
def digits_loaders(digits_bundle: DataBundle) -> RunLoaders:
    return build_run_loaders(digits_bundle, batch_size=64, eval_batch_size=256, seed=0)


@pytest.fixture
def recipe(tmp_path: Path) -> Recipe:
    return parse_recipe(tiny_recipe(tmp_path))
