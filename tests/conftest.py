"""Shared fixtures: the real MNIST (from MNIST_ROOT or the config's data_root) and small
configs in tmp folders."""

from pathlib import Path

import pytest
import yaml

import vae_helpers as vh

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def config():
    """The project's config.yaml, as every notebook loads it."""
    return vh.load_config(ROOT / "config.yaml")


@pytest.fixture(scope="session")
def mnist(config):
    """The real training, validation and test splits on the CPU."""
    return vh.mnist_splits(config, device="cpu")


@pytest.fixture
def write_config(tmp_path):
    """Write a YAML config (a dict, or raw text) into a tmp folder; return its path."""

    def write(content, name="config.yaml"):
        path = tmp_path / name
        path.write_text(
            content if isinstance(content, str) else yaml.safe_dump(content)
        )
        return path

    return write


@pytest.fixture
def small_data(mnist):
    """2,000 real training images and 500 validation images: enough to train a few quick
    epochs."""
    return {
        "train": tuple(t[:2000] for t in mnist["train"]),
        "validation": tuple(t[:500] for t in mnist["validation"]),
        "test": tuple(t[:500] for t in mnist["test"]),
    }
