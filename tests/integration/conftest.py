"""Fixtures the provider tests share (their helpers are in providerlib.py)."""

from __future__ import annotations

import pytest
from providerlib import Calls


@pytest.fixture
def calls() -> Calls:
    """Records what a provider reports: on_error(reason) and on_ok()."""
    return Calls()
