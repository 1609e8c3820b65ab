# Lets mypy resolve `from estargz_blobkit import ...` (see pyproject.toml [tool.mypy]).
from tests.estargz.estargz_blobkit import *  # noqa: F403
