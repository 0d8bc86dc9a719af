"""Stand-in package (Forge / reForge back end), written from a reading of upstream."""
