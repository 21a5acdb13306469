"""The `dvos` command line."""
