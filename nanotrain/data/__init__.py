"""Training data for nanotrain: shards, the BPE tokenizer and the packing data loader.

  shards.py     the shard layout (base_data/shard_NNNNN.parquet, `text` column, last = validation),
                list_shards / split_shards / data_fingerprint / iter_documents, atomic shard writing
  download.py   ClimbMix shards over HTTP (parallel, retried with back-off, resumed, atomic)
  build.py      shards from the user's .txt/.md/.jsonl/.parquet files
  sample.py     an offline corpus from the documentation installed on the machine
  tokenizer.py  Tokenizer (tiktoken encoding, rustbpe training), load_tokenizer, train_tokenizer
  loader.py     DataLoader: BOS-aligned best-fit packed (inputs, targets) with exact resumable state
  cli.py        the `nanotrain-data` command

Submodules are imported on use (`from nanotrain.data.loader import DataLoader`), so the command's
data subcommands start without loading torch.
"""
