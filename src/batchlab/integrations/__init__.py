"""Integrations: Lightning, Hugging Face Transformers, DDP. Each imports its library lazily."""
