"""First-party dare plugins (installed as the ``dare_plugins`` package)."""
