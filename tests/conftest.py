"""Shared test settings: deterministic CPU runs, no network, no hub downloads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--repin",
        default="",
        metavar="REASON",
        help="rewrite the pinned snapshots in tests/assets, recording REASON (why they changed)",
    )
