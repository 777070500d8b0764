"""Real-model fixtures (tests/real_model_fixture.py) for the tests of this folder."""
from tests.real_model_fixture import real_model, real_model_dir  # noqa: F401 (pytest fixtures)
