"""nanotrain: pretrain compute-optimal GPT base models from scratch with one dial, --depth."""

__version__ = "0.1.0"
