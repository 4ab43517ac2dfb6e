"""Triton kernels for the decode hot paths; each is tested against its torch reference in kvcache.methods."""
