"""Decode-time compression: the cache of *generated* tokens cut back to a budget as it grows (the third knob)."""
