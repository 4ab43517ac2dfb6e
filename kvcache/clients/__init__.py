"""Clients of the store: the protocol every engine codes against, in-process, remote (gRPC) and sharded."""
