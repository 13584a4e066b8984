"""opt-deus: depth up-scaling of Hugging Face causal language models."""

__version__ = "0.1.0"
