"""Stand-in for the webui's ``modules`` package (written from a reading of upstream; no upstream code)."""
