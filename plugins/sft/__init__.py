"""sft plugin (being written)."""
