"""Generated stubs of proto/kvcache.proto (`make proto`) and the codecs between them and torch."""
