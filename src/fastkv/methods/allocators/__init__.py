"""Allocators: how a KV budget is spread over layers and heads, one file each."""
