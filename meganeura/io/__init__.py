"""Model files: safetensors, GGUF, tokenizers and chat templates."""
