"""Fixtures shared by the test modules."""

import os

import pytest

_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_rank_variables():
    """In-process Composer runs leave RANK, WORLD_SIZE, LOCAL_RANK, ... in os.environ; a later
    launcher (Composer's, Lightning's DDP) would take them for its own and not start processes."""
    saved = {k: os.environ.get(k) for k in _RANK_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits at 16x16, split with seed 0 (read-only for the tests)."""
    pytest.importorskip("sklearn")
    from coap_plugins.examples import load_digits_tensors

    return load_digits_tensors(size=16, seed=0)
