# Lets mypy resolve `from attach_testkit import ...` (see pyproject.toml [tool.mypy]).
from tests.host.attach_testkit import *  # noqa: F403
