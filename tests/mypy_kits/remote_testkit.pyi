# Lets mypy resolve `from remote_testkit import ...` (see pyproject.toml [tool.mypy]).
from tests.snapshotter.remote_testkit import *  # noqa: F403
