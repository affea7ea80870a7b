"""Fixtures shared by the test modules."""
import pytest

from unclip_mini import data


@pytest.fixture(scope="session")
def world():
    """The smoke preset's toy world (16 px, small splits)."""
    return data.ToyWorld(data.DataConfig.smoke())


@pytest.fixture(scope="session")
def toy():
    """The toy preset's world (32 px)."""
    return data.ToyWorld(data.DataConfig.toy())
