"""The trained tiny model of the integration tests, for the scheduler's tests."""

from tests.integrations.conftest import trained_model  # noqa: F401  (a fixture)
