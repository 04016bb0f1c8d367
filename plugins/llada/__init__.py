"""llada plugin (being written)."""
