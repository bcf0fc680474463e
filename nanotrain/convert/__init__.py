"""Models that leave nanotrain (and nanochat models that come in).

- `nanochat.export_nanochat` / `nanochat.import_nanochat`: nanochat's base-checkpoint layout, both ways;
- `hf.export_hf`: a Hugging Face folder (safetensors, config, tokenizer.json, remote-code modeling file),
  optionally pushed to the Hub.

The command line is `nanotrain-convert` (cli.py). transformers, tokenizers, safetensors and huggingface_hub
are needed by export-hf only and imported there.
"""
