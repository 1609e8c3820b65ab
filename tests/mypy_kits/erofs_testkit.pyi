# Lets mypy resolve `from erofs_testkit import ...` (see pyproject.toml [tool.mypy]).
from tests.erofs.erofs_testkit import *  # noqa: F403
