"""The profile tests use the repo-wide ``tiny_llama`` (tests/conftest.py) with one torch thread."""

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield
