"""The `shapes` world (WORLDS.md 2): a mini text-to-image benchmark with an exact verifier."""
