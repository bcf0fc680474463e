"""`nanotrain-convert`: take a model out of nanotrain, or bring a nanochat model in.

    nanotrain-convert export-nanochat --model-tag d20 [--step N] [--base-dir B] --out DIR
    nanotrain-convert import-nanochat DIR --model-tag NAME [--nanochat-tag d20] [--step N] [--base-dir B]
    nanotrain-convert export-hf --model-tag d20 [--step N] [--base-dir B] --out DIR [--push-to-hub USER/NAME]

See nanotrain/convert/nanochat.py for what differs between the two codebases and how each difference is
handled, and nanotrain/convert/hf.py for the files of a Hugging Face export.
"""
from __future__ import annotations

import argparse
import sys

from nanotrain.errors import exit_code_of


def _step(value: str) -> int | str:
    if value == "latest":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'latest', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a step is >= 0, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanotrain-convert",
                                     description="Export nanotrain base models to nanochat and Hugging Face "
                                                 "transformers, or import a nanochat base checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    base_help = "nanotrain base directory ($NANOTRAIN_BASE_DIR, else ~/.cache/nanotrain)"
    window_help = ("convert even when nanochat sizes this model's short attention windows differently (the "
                   "logits change on the other side; the change is recorded in the written meta)")

    p = sub.add_parser("export-nanochat", help="write a checkpoint as a nanochat base directory")
    p.add_argument("--model-tag", required=True, help="nanotrain checkpoint folder (e.g. d20)")
    p.add_argument("--step", type=_step, default="latest", help="step to export, or 'latest' (default)")
    p.add_argument("--base-dir", default=None, help=base_help)
    p.add_argument("--out", required=True, help="the nanochat base directory to write (NANOCHAT_BASE_DIR)")
    p.add_argument("--allow-window-change", action="store_true", help=window_help)
    p.add_argument("--embeddings-bf16", action="store_true",
                   help="store wte and value embeddings in bfloat16 as nanochat's GPU runs do (rounds them; "
                        "default float32, lossless)")
    p.add_argument("--overwrite", action="store_true", help="replace an export of the same tag and step")

    p = sub.add_parser("import-nanochat", help="save a nanochat base checkpoint as a nanotrain checkpoint")
    p.add_argument("src", metavar="DIR", help="nanochat base directory (holds base_checkpoints/ and tokenizer/)")
    p.add_argument("--model-tag", required=True, help="nanotrain checkpoint folder to create")
    p.add_argument("--nanochat-tag", default=None, help="model tag inside DIR (default: the only one)")
    p.add_argument("--step", type=int, default=None, help="nanochat step to import (default: the last)")
    p.add_argument("--base-dir", default=None, help=base_help)
    p.add_argument("--allow-window-change", action="store_true", help=window_help)

    p = sub.add_parser("export-hf", help="write a Hugging Face transformers folder (and optionally upload it)")
    p.add_argument("--model-tag", required=True, help="nanotrain checkpoint folder (e.g. d20)")
    p.add_argument("--step", type=_step, default="latest", help="step to export, or 'latest' (default)")
    p.add_argument("--base-dir", default=None, help=base_help)
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the folder to this Hub model repo (user/name), created if missing")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


def run(args: argparse.Namespace) -> str:
    """Do the conversion; returns the line to print."""
    if args.command == "export-nanochat":
        from nanotrain.convert.nanochat import export_nanochat

        path = export_nanochat(args.model_tag, args.out, args.step, args.base_dir,
                               allow_window_change=args.allow_window_change, embeddings_bf16=args.embeddings_bf16,
                               overwrite=args.overwrite)
        return (f"wrote {path} (weights only, no optimizer state); use it with NANOCHAT_BASE_DIR={args.out} and "
                f"--model-tag {args.model_tag}")
    if args.command == "import-nanochat":
        from nanotrain.convert.nanochat import import_nanochat

        path = import_nanochat(args.src, args.model_tag, args.step, args.base_dir, nanochat_tag=args.nanochat_tag,
                               allow_window_change=args.allow_window_change)
        return (f"wrote {path} (weights only: no optimizer, data-loader or loop state); evaluate it with "
                f"`nanotrain-eval --model-tag {args.model_tag}`")
    from nanotrain.convert.hf import export_hf

    path = export_hf(args.model_tag, args.out, args.step, args.base_dir, overwrite=args.overwrite,
                     push_to_hub=args.push_to_hub, private=args.private)
    pushed = f" and uploaded it to {args.push_to_hub}" if args.push_to_hub else ""
    return (f"wrote {path}{pushed}; load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) "
            "and AutoTokenizer.from_pretrained(...)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: print(run(args)))


if __name__ == "__main__":
    sys.exit(main())
