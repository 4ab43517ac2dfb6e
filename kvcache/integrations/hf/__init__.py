"""The Hugging Face `transformers` integration: a Cache whose layers live in a kvcache store, and the attention function
that decodes through it (docs/transformers.md). `kvcache.integrations.transformers` is its public face."""
