from collections.abc import Iterator

import pytest

from blockfs.registry import RegistryClient
from tests.helpers.registry import (
    FAST_RETRY,
    registry,  # noqa: F401 - the shared registry fixture
)


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    """A client for plain-HTTP loopback registries without a hosts directory."""
    with RegistryClient(plain_http=True, retry=FAST_RETRY, trust_env=False) as c:
        yield c
