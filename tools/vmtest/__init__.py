"""The automated real-kernel VM test: Debian's kernel under qemu, blockfs on /dev/nbd0.

Run it as ``tools/vm-test``; see docs/vm-test.md. This package is also imported inside
the guest (guest.py, _relay.py, _wire.py), so this file imports nothing.
"""
