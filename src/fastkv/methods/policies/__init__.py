"""Cache policies: which KV entries each layer keeps for decoding, one file each."""
