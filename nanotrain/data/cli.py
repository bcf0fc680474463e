"""`nanotrain-data`: get training data and train the tokenizer.

  nanotrain-data download -n 8           ClimbMix shards (8 train + the validation shard)
  nanotrain-data build PATH...           shards from your .txt/.md/.jsonl/.parquet files
  nanotrain-data sample                  offline corpus from the docs installed on this machine
  nanotrain-data tokenizer               train the BPE tokenizer on the training shards

Every subcommand takes --base-dir (default $NANOTRAIN_BASE_DIR, else ~/.cache/nanotrain).
"""
from __future__ import annotations

import argparse
import sys
import time

from nanotrain import paths
from nanotrain.errors import UserError, exit_code_of


def _positive(text: str) -> int:
    try:
        value = int(float(text.replace("_", "")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_download(args: argparse.Namespace) -> None:
    from nanotrain.data.download import download

    download(args.num_files, args.base_dir, workers=args.workers, base_url=args.url, retries=args.retries,
             backoff=args.backoff, timeout=args.timeout, force=args.force)


def cmd_build(args: argparse.Namespace) -> None:
    from nanotrain.data.build import build

    build(args.paths, args.base_dir, docs_per_shard=args.docs_per_shard, seed=args.seed, force=args.force)


def cmd_sample(args: argparse.Namespace) -> None:
    from nanotrain.data import shards as S
    from nanotrain.data.sample import make_sample

    t0 = time.time()
    # refuse before the work, but delete nothing: write_shards replaces the old shards once the new ones are written
    S.prepare_data_dir(args.base_dir, "sample", args.force, check_only=True)
    print(f"collecting at least {args.min_bytes / 1e6:.1f} MB of documentation text installed on this machine")
    docs, stats = make_sample(args.min_bytes, max_doc_chars=args.max_doc_chars, seed=args.seed)
    out = S.write_shards(docs, args.base_dir, args.docs_per_shard,
                         {"source": "sample", "min_bytes": args.min_bytes, "seed": args.seed,
                          "max_doc_chars": args.max_doc_chars, "documents": len(docs), "bytes": stats["bytes"]})
    chars = sum(len(d) for d in docs)
    print(f"{len(docs)} documents, {chars:,} characters ({stats['bytes'] / 1e6:.1f} MB) from {stats['files']} files "
          f"({stats['duplicates']} duplicate docstrings dropped)")
    print(f"wrote {len(out)} shards to {out[0].parent} ({len(out) - 1} train + 1 validation: {out[-1].name}) "
          f"in {time.time() - t0:.1f}s")


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from nanotrain.data import shards as S
    from nanotrain.data.tokenizer import train_tokenizer

    t0 = time.time()
    train_shards = S.split_shards("train", args.base_dir)
    signature = S.shard_signature(train_shards)
    count = {"docs": 0, "chars": 0}

    def texts():
        for text in S.iter_documents("train", args.base_dir, doc_cap=args.doc_cap, max_chars=args.max_chars):
            count["docs"] += 1
            count["chars"] += len(text)
            yield text

    print(f"training a BPE tokenizer of {args.vocab_size} tokens on {len(train_shards)} training shard(s) "
          f"of {paths.data_dir(args.base_dir)}")
    meta = {"data_fingerprint": S.fingerprint_of(signature), "training_shards": signature,
            "requested_vocab_size": args.vocab_size, "doc_cap": args.doc_cap, "max_chars": args.max_chars}
    tok = train_tokenizer(texts(), args.vocab_size, meta=meta)
    if not count["chars"]:
        raise UserError(f"the training shards of {paths.data_dir(args.base_dir)} hold no text (empty corpus); "
                        "rebuild them with `nanotrain-data sample`, `build` or `download`")
    tok.meta.update(train_documents=count["docs"], train_chars=count["chars"])
    t_train = time.time() - t0
    out = tok.save(paths.tokenizer_dir(args.base_dir))
    print(f"trained on {count['docs']} documents, {count['chars']:,} characters in {t_train:.1f}s")
    if tok.vocab_size < args.vocab_size:
        S.warn(f"the corpus supplied only {tok.vocab_size - len(tok.special_tokens) - 256} merges: the vocabulary "
               f"has {tok.vocab_size} tokens, not {args.vocab_size}")
    # compression on the validation shard (capped, so a huge validation shard stays quick)
    val = list(S.iter_documents("val", args.base_dir, max_chars=20_000_000))
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    n_tokens = sum(len(ids) for ids in tok.encode(val))
    ratio = n_bytes / max(n_tokens, 1)
    print(f"validation shard: {n_bytes:,} bytes -> {n_tokens:,} tokens, {ratio:.2f} bytes/token")
    print(f"saved tokenizer (vocab {tok.vocab_size}, fingerprint {tok.fingerprint}) to {out} in "
          f"{time.time() - t0:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanotrain-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--base-dir", default=None,
                       help=f"base directory (default ${paths.ENV_VAR}, else ~/.cache/nanotrain); shards go in "
                            "its base_data/, the tokenizer in its tokenizer/")
        return p

    from nanotrain.data.download import BASE_URL

    p = add("download", "download the ClimbMix shards nanochat uses (the last shard, the validation split, always)")
    p.add_argument("-n", "--num-files", type=int, default=8, help="training shards to fetch, -1 for all (default 8)")
    p.add_argument("-w", "--workers", type=_positive, default=4, help="parallel downloads (default 4)")
    p.add_argument("--url", default=BASE_URL, help="base URL the shard files are under (default: Hugging Face)")
    p.add_argument("--retries", type=int, default=5, help="retries per shard after a failure (default 5)")
    p.add_argument("--backoff", type=float, default=2.0,
                   help="first retry delay in seconds, doubled at each retry (default 2)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    p.add_argument("--force", action="store_true", help="replace shards made by `sample` or `build`")
    p.set_defaults(func=cmd_download)

    p = add("build", "build shards from your own .txt/.md/.jsonl/.parquet files or directories")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (walked recursively)")
    p.add_argument("--docs-per-shard", type=_positive, default=10_000, help="documents per shard (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle (default 0)")
    p.add_argument("--force", action="store_true", help="replace shards that were downloaded or put there by hand")
    p.set_defaults(func=cmd_build)

    p = add("sample", "build an offline corpus from the documentation installed on this machine")
    p.add_argument("--min-bytes", type=_positive, default=6_000_000,
                   help="collect at least this much text (default 6000000)")
    p.add_argument("--max-doc-chars", type=_positive, default=1000,
                   help="cut each file's documentation into documents of at most this many characters, at "
                        "paragraph boundaries (default 1000)")
    p.add_argument("--docs-per-shard", type=_positive, default=2000, help="documents per shard (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle (default 0)")
    p.add_argument("--force", action="store_true", help="replace shards that were downloaded or put there by hand")
    p.set_defaults(func=cmd_sample)

    p = add("tokenizer", "train the BPE tokenizer on the training shards")
    p.add_argument("--vocab-size", type=_positive, default=32768, help="tokens, special ones included (default 32768)")
    p.add_argument("--max-chars", type=_positive, default=2_000_000_000,
                   help="train on at most this many characters (default 2e9)")
    p.add_argument("--doc-cap", type=_positive, default=10_000,
                   help="use at most this many characters of each document (default 10000)")
    p.set_defaults(func=cmd_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
