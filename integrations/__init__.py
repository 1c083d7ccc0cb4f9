"""Runnable examples, deployment files and the shutdown simulator (not shipped in the wheel)."""
