"""Model stage: resolve a model spec, dequantize embedded GGUF models once, load model + tokenizer."""
