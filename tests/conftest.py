"""Shared test setup.

Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1),
which has to be set before triton is first imported.
"""

from __future__ import annotations

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A small ISFE model exported with the export code (see tests/helpers_models.py), once per session."""
    from tests.helpers_models import shared_model

    return shared_model(tmp_path_factory)


@pytest.fixture(scope="session")
def enc(model):
    """An isfe_model.Encoder on the session's model."""
    from isfe_model import Encoder

    return Encoder(model.onnx_path)
