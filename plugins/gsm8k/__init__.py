"""gsm8k plugin (being written)."""
