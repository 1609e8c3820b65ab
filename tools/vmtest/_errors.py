"""The error of the VM test's host side."""

from blockfs.errors import BlockfsError


class VMTestError(BlockfsError):
    """The VM test could not be prepared or run (not a failed check: that is a FAIL)."""
