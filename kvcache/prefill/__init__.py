"""Sparse prefill served from the store: MInference index builders and the learned gate's block index."""
