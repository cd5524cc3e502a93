"""Fine-tuning: LoRA adapters on a model whose frozen experts stay quantized on the CPU."""
