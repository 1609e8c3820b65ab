"""The automated real-kernel VM test: Debian's kernel under qemu, blockfs on /dev/nbdN.

Two scenarios: blockfs's attach code against a server on the host, and containerd with
blockfs-snapshotter inside the guest. Run it as ``tools/vm-test``; see docs/vm-test.md.
This package is also imported inside the guest (guest.py, _relay.py, _wire.py), so this
file imports nothing.
"""
