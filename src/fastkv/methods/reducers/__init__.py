"""Context reducers: which tokens continue through depth during prefill, one file each."""
