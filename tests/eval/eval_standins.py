"""Small stand-ins for the evaluation tests: a byte-level tokenizer, a bigram language model whose
answers are known by construction, and a writer for handmade CORE bundles."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

BOS = 256


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255) plus BOS = 256: token boundaries are exact, so the scored
    spans of every CORE prompt are the ones a reader expects."""

    vocab_size = 257
    bos_token_id = BOS

    def _one(self, text: str, prepend, append) -> list[int]:
        ids = list(text.encode("utf-8"))
        if prepend is not None:
            ids = [prepend] + ids
        if append is not None:
            ids = ids + [append]
        return ids

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        if isinstance(text, str):
            return self._one(text, prepend, append)
        return [self._one(t, prepend, append) for t in text]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, device=None) -> Tensor:
        tb = torch.ones(self.vocab_size, dtype=torch.int32, device=device)
        tb[BOS] = 0
        return tb


@dataclass
class _Config:
    sequence_len: int
    vocab_size: int


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next token depends on the current one only, so what the model
    prefers at every scored position is fixed by the table, whatever the prompt around it."""

    def __init__(self, table: Tensor, sequence_len: int = 4096):
        super().__init__()
        self.table = torch.nn.Parameter(table.float())
        self.config = _Config(sequence_len, table.shape[0])
        self.calls = 0

    def forward(self, idx: Tensor, targets: Tensor | None = None, kv_cache=None, loss_reduction: str = "mean"):
        self.calls += 1
        logits = self.table[idx]  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


def oracle_table(strength: float = 10.0) -> Tensor:
    """The oracle's bigrams: ' ' after ':' and after '@'; 'z' after ' ' and after 'z' (all else uniform)."""
    t = torch.zeros(257, 257)
    for prev, nxt in ((":", " "), ("@", " "), (" ", "z"), ("z", "z")):
        t[ord(prev), ord(nxt)] = strength
    return t


def write_bundle(root: Path, tasks: list[dict], rows: dict[str, list[dict]]) -> Path:
    """A bundle in nanochat's layout: tasks are core.yaml entries plus a 'baseline' (percent)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
        for t in tasks:
            w.writerow([t["label"], "test", t["icl_task_type"], t["num_fewshot"][0], len(rows[t["label"]]),
                        t["baseline"]])
            entries.append({k: v for k, v in t.items() if k != "baseline"})
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    for t in tasks:
        path = root / "eval_data" / t["dataset_uri"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[t["label"]]))
    return root


def handmade_rows() -> tuple[list[dict], dict[str, list[dict]]]:
    """Tasks of each type whose rows carry "oracle": whether the oracle bigram model gets them right.

    multiple_choice: answers "zzzz" / "yyyy" / "xxxx" / "wwww" after "<query> "; the oracle picks "zzzz".
    schema: contexts ending in "@" or "#", then " <continuation>"; the oracle picks the "@" context.
    language_modeling: the oracle greedily continues ":" with " zzz...", so all-'z' continuations are right.
    """
    mc, schema, lm, lm_space = [], [], [], []
    letters = ["zzzz", "yyyy", "xxxx", "wwww"]
    for k in range(8):
        zpos = (3 * k) % 4
        right = k in (0, 1, 2, 4, 6)
        choices = [letters[(i - zpos) % 4] for i in range(4)]  # "zzzz" sits at zpos
        gold = zpos if right else (zpos + 1 + k % 3) % 4
        mc.append({"query": f"Item {k} asks which one:", "choices": choices, "gold": gold, "oracle": right})
    for k in range(6):
        right = k in (0, 2, 3, 5)
        options = [f"Case {k} alpha @", f"Case {k} beta #"]
        if k % 2:
            options.reverse()
        at = 0 if options[0].endswith("@") else 1
        schema.append({"context_options": options, "continuation": f"then it stops {k}.",
                       "gold": at if right else 1 - at, "oracle": right})
    conts = ["zzz", "zzy", "zzzzz", "yes", "z", "zaz", "nope"]
    for k, c in enumerate(conts):
        lm.append({"context": f"Prompt {k} wants:  ", "continuation": c, "oracle": set(c) == {"z"}})
        lm_space.append({"context": f"Say {k} now:", "continuation": c, "oracle": set(c) == {"z"}})
    tasks = [
        {"label": "mc", "dataset_uri": "cat_a/mc.jsonl", "num_fewshot": [2], "icl_task_type": "multiple_choice",
         "baseline": 25},
        {"label": "schema", "dataset_uri": "cat_a/schema.jsonl", "num_fewshot": [1], "icl_task_type": "schema",
         "baseline": 50},
        {"label": "lm", "dataset_uri": "cat_b/lm.jsonl", "num_fewshot": [2], "icl_task_type": "language_modeling",
         "continuation_delimiter": "\nAnswer: ", "baseline": 0},
        {"label": "lm_space", "dataset_uri": "cat_b/lm_space.jsonl", "num_fewshot": [0],
         "icl_task_type": "language_modeling", "baseline": 0},
    ]
    return tasks, {"mc": mc, "schema": schema, "lm": lm, "lm_space": lm_space}
