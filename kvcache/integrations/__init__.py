"""The KV store under other libraries' models: `kvcache.integrations.transformers` (docs/transformers.md).

Each needs its library installed (an optional extra: `pip install kvcache[transformers]`); nothing below this package
imports it.
"""
