"""Shared fixtures: small real subsets of ../shared/datasets, written as CSVs in a temp folder."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
SNOW = DATASETS / "snowleopard"
NYALA = DATASETS / "nyala"


def pytest_configure(config):
    if not (SNOW / "labels.csv").is_file():
        raise pytest.UsageError(f"test data not found at {DATASETS}; the tests read ../shared/datasets beside the repo")


@pytest.fixture(scope="session")
def snow_table() -> pd.DataFrame:
    return pd.read_csv(SNOW / "labels.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="session")
def snow_subset_csv(tmp_path_factory, snow_table) -> Path:
    """Two encounters each of three unambiguous cats, at most 4 frames per encounter (19 images)."""
    table = snow_table[snow_table["unambiguous"] == "True"]
    picked = []
    for identity in ("Cat1", "Cat5", "Cat21"):
        encounters = sorted(table.loc[table["identity"] == identity, "encounter"].unique())[:2]
        for encounter in encounters:
            picked.append(table[table["encounter"] == encounter].head(4))
    subset = pd.concat(picked)
    folder = tmp_path_factory.mktemp("snow_subset")
    csv = folder / "labels.csv"
    subset.to_csv(csv, index=False)
    (folder / "images").symlink_to(SNOW / "images")
    return csv


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, snow_subset_csv) -> Path:
    """A 1-epoch `tiny` preset model: fast, learns nothing; for plumbing tests only."""
    from spotmatch.config import merge_config
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.global_embed import train as training
    from spotmatch.global_embed.presets import PRESETS

    preset = PRESETS["tiny"]
    out = tmp_path_factory.mktemp("tiny_run")
    return training.main(load_dataset(snow_subset_csv), preset.embedder, merge_config(preset.train, epochs=1),
                         SplitConfig(by="encounter", near_duplicate_distance=-1), out)
