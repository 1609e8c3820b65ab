# Lets mypy resolve `from test_layer_image import ...` (see pyproject.toml [tool.mypy]).
from tests.image.test_layer_image import *  # noqa: F403
