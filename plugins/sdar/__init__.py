"""sdar plugin (being written)."""
