"""The root of every error blockfs raises on purpose."""


class BlockfsError(Exception):
    """Base class of all blockfs errors; catch it to handle any of them."""
