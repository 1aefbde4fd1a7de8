"""Scorers: token importance at a layer, one file each."""
