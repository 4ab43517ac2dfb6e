"""The engine: a Llama-architecture decoder (SmolLM2-135M from its GGUF file) whose attention goes through kvcache."""
