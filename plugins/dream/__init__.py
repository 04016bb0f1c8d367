"""dream plugin (being written)."""
