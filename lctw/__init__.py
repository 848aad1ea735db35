"""lctw: long-context token weighting."""
