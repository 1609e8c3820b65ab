from tests.helpers.registry import registry  # noqa: F401 - the shared registry fixture
