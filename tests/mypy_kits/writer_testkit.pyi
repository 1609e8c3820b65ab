# Lets mypy resolve `from writer_testkit import ...` (see pyproject.toml [tool.mypy]).
from tests.estargz.writer_testkit import *  # noqa: F403
