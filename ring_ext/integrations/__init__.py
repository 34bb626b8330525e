"""Adapters between ring_ext and other libraries' model APIs (hf: Hugging Face transformers)."""
