"""Shared fixtures: every behavioural test runs on both engines."""

import os

import pytest
from hypothesis import HealthCheck, settings

# A fast default for development, a thorough derandomised profile for CI.
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The compile cache (lpucore.compiler.store) is off for the suite: tests never write into the user's
# cache, and every test compiles afresh; tests/test_store.py turns it on in a temporary directory.
os.environ["LPUCORE_CACHE"] = "0"
os.environ.pop("LPUCORE_CACHE_DIR", None)

ENGINES = ["reference", "fast"]


@pytest.fixture(params=ENGINES)
def engine(request):
    """The engine under test; tests using it run once per engine."""
    return request.param


@pytest.fixture
def tiny():
    from lpucore import ChipConfig
    return ChipConfig.tiny()
