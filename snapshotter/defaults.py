"""Defaults that commands need before they talk to containerd, importable without gRPC."""

# containerd's own default socket.
CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"
# The proxy plugin name in containerd's configuration (tools/containerd/config.toml).
SNAPSHOTTER_NAME = "blockfs"
# The daemon's state directory, and where it takes pulls (snapshotter.pullserver).
ROOT = "/var/lib/blockfs"
PULL_SOCKET_NAME = "pull.sock"
PULL_SOCKET = f"{ROOT}/run/{PULL_SOCKET_NAME}"
