"""`kvcache serve`: the gRPC server over an in-process client, its request batching, locks and metrics."""
