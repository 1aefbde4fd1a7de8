"""Offline long-context evaluation: RULER's 13 tasks, needle-in-a-haystack grids, LongBench files."""
