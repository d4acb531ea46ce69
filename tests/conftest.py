"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits at 16x16, split with seed 0 (read-only for the tests)."""
    pytest.importorskip("sklearn")
    from coap_plugins.train.digits import load_digits_tensors

    return load_digits_tensors(size=16, seed=0)
