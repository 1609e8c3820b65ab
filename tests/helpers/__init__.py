"""Test helpers shared by several test packages (real registries, misbehaving servers)."""
