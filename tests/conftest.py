import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = ROOT.parent / "shared" / "data" / "omniglot"
sys.path.insert(0, str(ROOT))  # makes `tests.toy_experiment` importable in tests and subprocesses
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def omniglot_dir() -> Path:
    """The real Omniglot zips (../shared/data/omniglot); the test skips when they are absent."""
    if not (OMNIGLOT_DIR / "images_background.zip").exists():
        pytest.skip(f"real Omniglot not found at {OMNIGLOT_DIR}")
    return OMNIGLOT_DIR


@pytest.fixture
def toy_config(tmp_path) -> Path:
    """A config file for the toy experiment (tests/toy_experiment.py), running under tmp_path."""
    path = tmp_path / "toy.yaml"
    path.write_text(f"experiment: tests.toy_experiment\ndevice: cpu\nout_dir: {tmp_path / 'runs'}\n")
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A tiny synthetic scenes file for mastery runs (tests/mastery_helpers.py: write_scenes)."""
    from tests.mastery_helpers import write_scenes

    return write_scenes(tmp_path_factory.mktemp("scenes") / "scenes.h5", 400)
