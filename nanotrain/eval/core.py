"""The DCLM CORE metric: 22 in-context-learning tasks, centered accuracy, mean over tasks.

CORE (DCLM, arXiv 2406.11794) scores a base model on few-shot prompts of three kinds, each scored by
the model's next-token losses with no sampling:
  multiple_choice  one query, several answers: the answer with the lowest mean loss wins;
  schema           several contexts, one continuation: the context under which the continuation has
                   the lowest mean loss wins (Winograd-style);
  language_modeling one context, one continuation: correct when greedy decoding reproduces every
                   token of the continuation.
A task's accuracy is centered against its random baseline b (percent): (acc - b/100) / (1 - b/100),
so chance scores 0 and perfect scores 1; CORE is the mean centered accuracy over the tasks.

Prompts are rendered as nanochat renders them (so full-task scores are comparable with nanochat's):
each of the `num_fewshot` examples is "<prompt><delimiter><answer>\\n\\n", then the item itself. Rows
of each task are shuffled with a fixed seed; the few-shot examples of row i are drawn with a seed
that depends on i, from the whole task except row i. Unlike nanochat they are drawn from the whole
task even when `max_per_task` keeps fewer rows, so a truncated run scores each kept row exactly as a
full run would (and max_per_task smaller than num_fewshot + 1 works). Rows longer than the model's
sequence_len are cropped from the left (DCLM's llm-foundry also trims the context to its max_seq_len),
whereas nanochat runs its own GPT on the whole row. Many squad, boolq and bigbench_language_identification
rows exceed 2048 tokens, so with a short sequence_len those three tasks can score differently from nanochat.

The bundle layout (nanochat's eval_bundle): core.yaml (key `icl_tasks`), eval_data/<category>/*.jsonl,
eval_meta_data.csv (columns `Eval Task`, `Random baseline`). `ensure_eval_bundle` finds or downloads it.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from nanotrain import distributed, paths
from nanotrain.errors import UserError

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's address
BUNDLE_ENV_VAR = "NANOTRAIN_EVAL_BUNDLE"  # points at an unpacked bundle folder, like --bundle-dir
BUNDLE_URL_ENV_VAR = "NANOTRAIN_EVAL_BUNDLE_URL"  # downloads from a mirror instead of EVAL_BUNDLE_URL
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337        # the order of each task's rows (nanochat's seed)
FEWSHOT_SEED_BASE = 1234   # few-shot draw for row i uses seed FEWSHOT_SEED_BASE + i (nanochat's)


# -----------------------------------------------------------------------------------------------
# The bundle: find it, or download it once (ranks share one download through a file lock)

def _is_bundle(folder: Path) -> bool:
    return (folder / "core.yaml").is_file() and (folder / "eval_meta_data.csv").is_file()


def ensure_eval_bundle(base_dir: str | os.PathLike | None = None, url: str | None = None,
                       bundle_dir: str | os.PathLike | None = None, timeout: float = 60.0) -> Path:
    """The folder of the CORE bundle, downloading and unpacking it on first use.

    Order: `bundle_dir` (e.g. --bundle-dir), then $NANOTRAIN_EVAL_BUNDLE, then <base>/eval_bundle; when the
    last is missing it is downloaded from `url` (default $NANOTRAIN_EVAL_BUNDLE_URL, else nanochat's
    address) under an exclusive file lock (other ranks wait and then find it; no lock without fcntl) and unpacked into a
    temporary folder that is renamed into place, so a crash never leaves a half-written bundle behind.
    """
    explicit = bundle_dir or os.environ.get(BUNDLE_ENV_VAR)
    if explicit:
        folder = Path(explicit).expanduser()
        if not _is_bundle(folder):
            raise UserError(f"{folder} is not a CORE eval bundle (no core.yaml and eval_meta_data.csv there); "
                            f"point --bundle-dir (or ${BUNDLE_ENV_VAR}) at an unpacked eval_bundle folder")
        return folder
    target = paths.eval_bundle_dir(base_dir)
    if _is_bundle(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".eval_bundle.lock", "w") as lock:
        _wait_for_lock(lock)  # released when the file closes
        if _is_bundle(target):            # another rank (or process) finished it while we waited
            return target
        _download_and_unpack(url or os.environ.get(BUNDLE_URL_ENV_VAR) or EVAL_BUNDLE_URL, target, timeout)
    return target


def _wait_for_lock(f) -> None:
    """Hold an exclusive lock on an open file, waiting for it. Where fcntl is missing (Windows) there is no lock:
    importing and evaluating still work, but processes that fetch the bundle at the same time are not kept
    apart (fetch it once, e.g. with one `nanotrain-eval` run, before starting several)."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(f, fcntl.LOCK_EX)


def _download_and_unpack(url: str, target: Path, timeout: float) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".eval_bundle_tmp_") as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"could not download the CORE eval bundle from {url} ({e}); connect to the internet, "
                            f"or pass --bundle-dir DIR (or set ${BUNDLE_ENV_VAR}) to an unpacked eval_bundle "
                            f"folder, or unpack one at {target}") from None
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(archive) as zf:
                root = unpacked.resolve()
                for name in zf.namelist():  # refuse members that would land outside the folder
                    if not (unpacked / name).resolve().is_relative_to(root):
                        raise UserError(f"the archive from {url} has an unsafe member path {name!r}; "
                                        f"download the bundle by hand and pass --bundle-dir")
                zf.extractall(unpacked)
        except zipfile.BadZipFile:
            raise UserError(f"the file downloaded from {url} is not a zip archive; check the address, or pass "
                            f"--bundle-dir DIR to an unpacked eval_bundle folder") from None
        found = [p.parent for p in sorted(unpacked.rglob("core.yaml")) if _is_bundle(p.parent)]
        if not found:
            raise UserError(f"the archive from {url} holds no core.yaml with eval_meta_data.csv beside it; "
                            f"pass --bundle-dir DIR to an unpacked eval_bundle folder")
        if target.exists():  # a leftover partial folder (never ours: we rename into place)
            shutil.rmtree(target)
        os.replace(found[0], target)


# -----------------------------------------------------------------------------------------------
# Tasks and prompt rendering

@dataclass(frozen=True)
class CoreTask:
    """One ICL task of the bundle."""
    label: str
    task_type: str            # one of TASK_TYPES
    num_fewshot: int
    delimiter: str            # continuation delimiter between prompt and answer
    random_baseline: float    # percent
    data_path: Path


def load_tasks(bundle_dir: str | os.PathLike, tasks: Sequence[str] | None = None) -> list[CoreTask]:
    """The tasks listed in core.yaml (in its order), or the named subset of them."""
    import yaml

    bundle = Path(bundle_dir)
    with open(bundle / "core.yaml") as f:
        entries = yaml.safe_load(f)["icl_tasks"]
    with open(bundle / "eval_meta_data.csv", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    out = []
    for e in entries:
        label = e["label"]
        shots = e["num_fewshot"]
        shots = int(shots[0] if isinstance(shots, list) else shots)
        if e["icl_task_type"] not in TASK_TYPES:
            raise UserError(f"task {label} in {bundle / 'core.yaml'} has unknown type {e['icl_task_type']!r}; "
                            f"use one of {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise UserError(f"task {label} has no row in {bundle / 'eval_meta_data.csv'}; add its random baseline")
        out.append(CoreTask(label, e["icl_task_type"], shots, e.get("continuation_delimiter", " "),
                            baselines[label], bundle / "eval_data" / e["dataset_uri"]))
    if tasks is not None:
        known = {t.label for t in out}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise UserError(f"unknown CORE task(s) {', '.join(unknown)}; the bundle has: {', '.join(sorted(known))}")
        out = [t for t in out if t.label in set(tasks)]
    return out


def load_rows(task: CoreTask) -> list[dict]:
    """All rows of a task, in the seeded shuffled order every evaluation uses."""
    with open(task.data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows


def fewshot_indices(idx: int, num_rows: int, k: int) -> list[int]:
    """The rows shown as few-shot examples for row `idx`: k distinct rows of the task other than idx.

    Equal to nanochat's `Random(1234 + idx).sample([i for i in range(n) if i != idx], k)` without
    building that list: sampling positions of range(n - 1) and skipping idx is the same draw.
    """
    k = min(k, num_rows - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED_BASE + idx).sample(range(num_rows - 1), k)
    return [j + (j >= idx) for j in picks]


def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: Sequence[dict]) -> list[str]:
    """The texts to score for one item: one per choice (multiple_choice), per context (schema), or the
    [without, with] continuation pair (language_modeling)."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        # Contexts are stripped: some carry trailing whitespace that would merge into the continuation's
        # first token, and the prompt without the continuation must tokenize to a prefix of the one with it.
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delimiter}"
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unsupported CORE task type {task_type!r}")


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _common_suffix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(1, n + 1):
        t = seqs[0][-i]
        if any(s[-i] != t for s in seqs):
            return i - 1
    return n


@dataclass
class _Example:
    """One item ready for the model: token rows and, per row, the scored span [start, end)."""
    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int
    task_type: str
    task_index: int


def _spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """Scored spans; every span keeps at least one token and starts at position >= 1 (a token needs a
    predecessor to be predicted), so odd tokenizations degrade gracefully instead of scoring nothing."""
    if task_type == "multiple_choice":  # same context, different answers: score after the common prefix
        start = min(_common_prefix(tokens), min(len(t) for t in tokens) - 1)
        start = max(start, 1)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":  # different contexts, same continuation: score the common suffix
        suffix = min(max(_common_suffix(tokens), 1), min(len(t) for t in tokens) - 1)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens
    start = len(without) if with_[:len(without)] == without else _common_prefix(tokens)
    start = max(1, min(start, len(with_) - 1))
    return [with_], [start], [len(with_)]


def _crop_left(rows: list[list[int]], starts: list[int], ends: list[int], max_len: int | None) -> None:
    """Fit overlong rows into max_len tokens by dropping tokens on the left (the scored part is at the end).

    Every row of the example loses the same number of tokens when that leaves all scored spans whole, so
    the rows keep one shared context (every choice sees the same prompt, and the shared prefix can still
    run once); otherwise each row keeps its own last max_len tokens (nanochat's rule).
    """
    if max_len is None:
        return
    crop = max(len(r) for r in rows) - max_len
    if crop <= 0:
        return
    if crop <= min(starts) - 1:
        for i in range(len(rows)):
            rows[i] = rows[i][crop:]
            starts[i] -= crop
            ends[i] -= crop
        return
    for i, row in enumerate(rows):
        c = len(row) - max_len
        if c > 0:
            rows[i] = row[c:]
            starts[i] = max(1, starts[i] - c)
            ends[i] -= c


def _model_max_len(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "sequence_len", None)


def _make_batches(examples: list[_Example], batch_size: int, max_batch_tokens: int) -> list[list[_Example]]:
    """Group examples (longest first, so a batch pads little) into forwards of at most batch_size rows
    and max_batch_tokens padded tokens; an example's rows always stay in one forward."""
    order = sorted(examples, key=lambda ex: -max(len(r) for r in ex.rows))
    batches: list[list[_Example]] = []
    current: list[_Example] = []
    rows = width = 0
    for ex in order:
        n, w = len(ex.rows), max(len(r) for r in ex.rows)
        if current and (rows + n > batch_size or (rows + n) * max(width, w) > max_batch_tokens):
            batches.append(current)
            current, rows, width = [], 0, 0
        current.append(ex)
        rows += n
        width = max(width, w)
    if current:
        batches.append(current)
    return batches


def _span_scores(logits: Tensor, targets: Tensor, row_idx: Tensor, counts: list[int]) -> tuple[list[float], list[bool]]:
    """Per row: mean next-token loss over its scored positions, and whether greedy decoding hits all of them.

    logits: (N, V) at the scored positions, targets: (N,) the tokens they predict, row_idx: (N,) their row.
    """
    logits = logits.float()
    nll = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    hit = (logits.argmax(dim=-1) == targets).float()          # (N,)
    n = torch.tensor(counts, dtype=torch.float32, device=logits.device)
    mean_loss = torch.zeros(len(counts), device=logits.device).index_add_(0, row_idx, nll) / n
    all_hit = torch.zeros(len(counts), device=logits.device).index_add_(0, row_idx, hit) == n
    return mean_loss.tolist(), all_hit.tolist()


def _forward_rows(model: torch.nn.Module, batch: list[_Example], pad_id: int, device: torch.device,
                  make_ctx: Callable[[], ContextManager]) -> tuple[list[float], list[bool]]:
    """One forward over every row of the batch's examples (right-padded: causal, so harmless)."""
    rows = [r for ex in batch for r in ex.rows]
    starts = [s for ex in batch for s in ex.starts]
    ends = [e for ex in batch for e in ex.ends]
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    with make_ctx():
        logits = model(ids)  # (R, W, V)
    # Only the scored positions: position p predicts token p + 1.
    row_idx = torch.cat([torch.full((e - s,), i, dtype=torch.long) for i, (s, e) in enumerate(zip(starts, ends))])
    pos_idx = torch.cat([torch.arange(s - 1, e - 1, dtype=torch.long) for s, e in zip(starts, ends)])
    row_idx, pos_idx = row_idx.to(device), pos_idx.to(device)
    return _span_scores(logits[row_idx, pos_idx], ids[row_idx, pos_idx + 1], row_idx,
                        [e - s for s, e in zip(starts, ends)])


def _shared_prefix_len(ex: _Example) -> int:
    """Tokens every row of a multi-row example starts with, up to the first scored position (0: none)."""
    if len(ex.rows) < 2:
        return 0
    p = min(min(ex.starts), _common_prefix(ex.rows))
    return p if p >= 2 else 0


def _forward_shared_prefix(model: torch.nn.Module, ex: _Example, prefix: int, pad_id: int, device: torch.device,
                           make_ctx: Callable[[], ContextManager]) -> tuple[list[float], list[bool]]:
    """The rows of one example through the KV cache: the shared prefix (the few-shot context and the query)
    runs once, then every row's remainder runs against a copy of its cache. Same numbers as _forward_rows
    (up to rounding) at about 1/len(rows) of the compute for long few-shot prompts."""
    from nanotrain.model import KVCache

    cfg = model.config
    dtype = next(model.parameters()).dtype
    width = max(len(r) for r in ex.rows)

    def cache(batch: int) -> KVCache:
        return KVCache(batch, cfg.n_kv_head, width, cfg.head_dim, cfg.n_layer, device, dtype)

    one = cache(1)
    head = torch.tensor([ex.rows[0][:prefix]], dtype=torch.long, device=device)  # (1, P)
    with make_ctx():
        last = model(head, kv_cache=one)[0, -1]  # (V,) predicts each row's token at position P
    many = cache(len(ex.rows))
    many.prefill(one)
    tails = torch.full((len(ex.rows), width - prefix), pad_id, dtype=torch.long)
    for i, r in enumerate(ex.rows):
        tails[i, :len(r) - prefix] = torch.tensor(r[prefix:], dtype=torch.long)
    tails = tails.to(device)
    with make_ctx():
        logits = model(tails, kv_cache=many)  # (R, W - P, V): position P + j predicts token P + j + 1
    picked, targets, row_idx, counts = [], [], [], []
    for i, (r, s, e) in enumerate(zip(ex.rows, ex.starts, ex.ends)):
        pos = torch.arange(s - 1, e - 1, device=device)  # absolute positions, all >= P - 1
        rows_logits = torch.where((pos == prefix - 1)[:, None], last[None, :],
                                  logits[i, (pos - prefix).clamp(min=0)])
        picked.append(rows_logits)
        targets.append(torch.tensor(r[s:e], dtype=torch.long, device=device))
        row_idx.append(torch.full((e - s,), i, dtype=torch.long, device=device))
        counts.append(e - s)
    return _span_scores(torch.cat(picked), torch.cat(targets), torch.cat(row_idx), counts)


def _decide(batch: list[_Example], mean_loss: list[float], all_hit: list[bool]) -> list[bool]:
    """Whether each example is right: greedy hits every token (language_modeling), or the gold row has the
    lowest mean loss (ties go to the first row)."""
    out, r = [], 0
    for ex in batch:
        n = len(ex.rows)
        if ex.task_type == "language_modeling":
            out.append(bool(all_hit[r]))
        else:
            losses = mean_loss[r:r + n]
            out.append(losses.index(min(losses)) == ex.gold)
        r += n
    return out


@torch.no_grad()
def _score_examples(model: torch.nn.Module, examples: list[_Example], pad_id: int, device: torch.device,
                    make_ctx: Callable[[], ContextManager], batch_size: int, max_batch_tokens: int,
                    share_prefix: bool) -> list[bool]:
    """Correctness of each example (in order): multi-row examples with a shared prefix go through the KV
    cache one by one when share_prefix, the rest in padded batches."""
    verdict: dict[int, bool] = {}
    batched = []
    for i, ex in enumerate(examples):
        prefix = _shared_prefix_len(ex) if share_prefix else 0
        if prefix:
            verdict[i] = _decide([ex], *_forward_shared_prefix(model, ex, prefix, pad_id, device, make_ctx))[0]
        else:
            batched.append(i)
    index_of = {id(examples[i]): i for i in batched}
    for batch in _make_batches([examples[i] for i in batched], batch_size, max_batch_tokens):
        for ex, ok in zip(batch, _decide(batch, *_forward_rows(model, batch, pad_id, device, make_ctx))):
            verdict[index_of[id(ex)]] = ok
    return [verdict[i] for i in range(len(examples))]


def _supports_kv_cache(model: torch.nn.Module) -> bool:
    from nanotrain.model import GPT

    return isinstance(model, GPT)


def _prepare_task(task: CoreTask, ti: int, tokenizer: Any, max_per_task: int | None, max_len: int | None,
                  rank: int, world: int, totals: list[int]) -> list[_Example]:
    """Render and tokenize this rank's share of a task's rows (appends the task's row count to totals)."""
    rows = load_rows(task)
    n = len(rows) if max_per_task is None or max_per_task < 0 else min(max_per_task, len(rows))
    totals.append(n)
    mine = list(range(rank, n, world))
    prompts, sizes = [], []
    for idx in mine:
        shots = [rows[j] for j in fewshot_indices(idx, len(rows), task.num_fewshot)]
        p = render_prompts(task.task_type, rows[idx], task.delimiter, shots)
        prompts.extend(p)
        sizes.append(len(p))
    tokens = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id) if prompts else []
    examples, k = [], 0
    for idx, size in zip(mine, sizes):
        seqs, starts, ends = _spans(task.task_type, [list(t) for t in tokens[k:k + size]])
        k += size
        _crop_left(seqs, starts, ends, max_len)
        examples.append(_Example(seqs, starts, ends, int(rows[idx].get("gold") or 0), task.task_type, ti))
    return examples


def evaluate_core(model: torch.nn.Module, tokenizer: Any, device: torch.device | str,
                  bundle_dir: str | os.PathLike | None = None, max_per_task: int = -1,
                  tasks: Sequence[str] | None = None, batch_size: int = 64, max_batch_tokens: int | None = None,
                  max_seq_len: int | None = None, autocast_ctx: Callable[[], ContextManager] | None = None,
                  base_dir: str | os.PathLike | None = None, share_prefix: bool | None = None,
                  verbose: bool = False) -> dict[str, Any]:
    """Evaluate the CORE metric of `model` (its forward(idx (B, T)) must return logits (B, T, V)).

    bundle_dir: an unpacked bundle (default: ensure_eval_bundle(base_dir), downloading on first use).
    max_per_task: rows per task (-1 = all). tasks: labels to run (default all, in core.yaml order).
    batch_size / max_batch_tokens: rows and padded tokens per forward (several examples share one; an example
    always gets a forward of its own when it alone is bigger). Default tokens: 2**27 / vocab, so one copy of
    the float32 logits stays near 512 MB (4096 tokens at vocab 32768); raise it on a big GPU.
    max_seq_len: rows longer than this keep their last max_seq_len tokens (default: the model's
    config.sequence_len). autocast_ctx: factory of the context each forward runs under (see bpb.py).
    share_prefix: run the context shared by an example's rows once through the model's KV cache and only
    the rows' remainders per row (default: on CPU, where compute dominates; a GPU prefers big padded
    batches). Needs nanotrain's GPT (its KVCache); other models always take the batched path.
    Under torch.distributed, rank r scores rows i with i % world_size == r and counts are all-reduced.

    Returns {"results": {label: accuracy}, "centered_results": {label: centered accuracy},
    "num_examples": {label: n}, "core_metric": mean centered accuracy, "seconds": wall time}.
    """
    t0 = time.perf_counter()
    if max_per_task == 0:  # 0 rows would score every task 0 and report a negative CORE
        raise UserError("max_per_task is 0; pass a positive number of rows per task, or -1 for all of them")
    device = torch.device(device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    # Under torch.distributed, everything that can fail on one rank alone (the bundle, a forward out of memory) runs
    # inside a sum_over_ranks, whose collective every rank reaches: a failure on one rank fails the evaluation on
    # every rank (PeerFailed on the others), none is left waiting. First the tasks (every rank must see the same):
    setup: dict[str, Any] = {}

    def load() -> Tensor:
        setup["tasks"] = load_tasks(Path(bundle_dir) if bundle_dir is not None else ensure_eval_bundle(base_dir),
                                    tasks)
        return torch.tensor([len(setup["tasks"])])

    counted = distributed.sum_over_ranks(load, 1, device)
    task_list = setup["tasks"]
    if int(counted.item()) != world * len(task_list):
        raise UserError(f"the ranks read different CORE bundles (task counts sum to {int(counted.item())} over "
                        f"{world} ranks, this one has {len(task_list)}); give every node the same eval_bundle")
    max_len = max_seq_len if max_seq_len is not None else _model_max_len(model)
    if max_batch_tokens is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or tokenizer.vocab_size
        max_batch_tokens = max(1024, 2**27 // vocab)
    make_ctx = autocast_ctx or contextlib.nullcontext
    if share_prefix is None:
        share_prefix = device.type == "cpu"
    share_prefix = share_prefix and _supports_kv_cache(model)
    bos = tokenizer.bos_token_id
    totals: list[int] = []

    def score() -> Tensor:  # this rank's correct count per task
        correct = torch.zeros(len(task_list), dtype=torch.float64)
        for ti, task in enumerate(task_list):  # one task at a time keeps the tokenized rows small
            examples = _prepare_task(task, ti, tokenizer, max_per_task, max_len, rank, world, totals)
            correct[ti] += sum(_score_examples(model, examples, bos, device, make_ctx, batch_size, max_batch_tokens,
                                               share_prefix))
        return correct

    correct = distributed.sum_over_ranks(score, len(task_list), device).cpu()

    results, centered, counts = {}, {}, {}
    for ti, task in enumerate(task_list):
        acc = float(correct[ti]) / max(totals[ti], 1)
        base = 0.01 * task.random_baseline
        results[task.label] = acc
        centered[task.label] = (acc - base) / (1.0 - base)
        counts[task.label] = totals[ti]
        if verbose and rank == 0:
            print(f"{task.label:<34} accuracy {acc:.4f}  centered {centered[task.label]:+.4f}  (n={totals[ti]})")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "num_examples": counts,
            "core_metric": core, "seconds": time.perf_counter() - t0}
