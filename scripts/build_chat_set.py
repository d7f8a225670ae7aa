#!/usr/bin/env python3
"""Build lorafuse's small multi-turn chat set from chatterbot-corpus 1.3.3 (English).

The default dataset (``data/chatterbot_en.jsonl``, ``scripts/convert_chatterbot.py``) cuts every
corpus conversation into (question, answer) pairs. This script keeps the conversations whole, for
chat tuning (``lorafuse finetune --data data/chatterbot_chat_en.jsonl``): each becomes one
``messages`` record with a system turn, the user at even positions and the assistant at odd ones,
as the corpus orders them.

Rules (deterministic; rerunning gives the same bytes):

* files ``chatterbot_corpus/data/english/*.yml``, sorted by byte-wise file name, parsed with
  PyYAML ``safe_load``; each file's ``conversations`` list, in order;
* a conversation is kept when it is a list of at least four turns (two exchanges or more); a
  trailing user turn (odd length) is dropped so that every record ends with the assistant;
* every turn goes through ``str()`` and ``strip()``; a conversation with an empty turn is
  skipped; exact duplicates (same turns) are dropped, keeping the first;
* the system turn is ``SYSTEM`` below, the same for every record;
* records are written in that order, one JSON object per line (``ensure_ascii=False``, UTF-8,
  ``\\n`` line endings); ``lorafuse`` splits them as it splits every dataset (record index
  ``i % 10 == 9`` is eval).

Usage::

    pip download --no-deps chatterbot-corpus==1.3.3 && unzip chatterbot_corpus-1.3.3-*.whl -d wheel
    python3 scripts/build_chat_set.py --corpus-dir wheel/chatterbot_corpus/data/english \\
        [--out data/chatterbot_chat_en.jsonl] [--check SHA256]

Requires PyYAML. Licence of the output: the corpus's BSD-3-Clause (data/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "chatterbot_chat_en.jsonl"
SYSTEM = "You are Chatterbot, a cheerful companion. Reply in one or two short sentences."
MIN_TURNS = 4


def corpus_files(corpus_dir: Path):
    """Each ``*.yml`` file of the corpus, by byte-wise name, with its ``conversations`` list
    (PyYAML ``safe_load``): ``(name, conversations)``."""
    files = sorted(
        (p.name for p in corpus_dir.iterdir() if p.name.endswith(".yml")),
        key=lambda name: name.encode("utf-8"),
    )
    if not files:
        raise SystemExit(f"ERROR: no *.yml files in {corpus_dir}")
    for name in files:
        with open(corpus_dir / name, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            raise SystemExit(f"ERROR: {name} has no `conversations` list")
        yield name, convs


def conversations(corpus_dir: Path) -> tuple[list, dict]:
    """The kept conversations (lists of turns) and what each rule removed."""
    counts = {"conversations": 0, "too_short": 0, "empty_turn": 0, "duplicates": 0}
    seen: set = set()
    kept = []
    for name, convs in corpus_files(corpus_dir):
        for conv in convs:
            counts["conversations"] += 1
            if not isinstance(conv, list) or len(conv) < MIN_TURNS:
                counts["too_short"] += 1
                continue
            turns = [str(t).strip() for t in conv]
            turns = turns[: len(turns) // 2 * 2]
            if not all(turns):
                counts["empty_turn"] += 1
                continue
            key = tuple(turns)
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            kept.append((name, turns))
    return kept, counts


def record(turns: list) -> dict:
    msgs = [{"role": "system", "content": SYSTEM}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": msgs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", help="expected sha256 of the output; nothing written on a difference")
    args = ap.parse_args()

    kept, counts = conversations(args.corpus_dir)
    lines = "".join(json.dumps(record(t), ensure_ascii=False) + "\n" for _, t in kept)
    data = lines.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    per_file: dict[str, int] = {}
    for name, _ in kept:
        per_file[name] = per_file.get(name, 0) + 1
    turns = sum(len(t) for _, t in kept)
    print(f"PyYAML {yaml.__version__}; {counts['conversations']} corpus conversations")
    print(f"removed: {counts['too_short']} with fewer than {MIN_TURNS} turns, "
          f"{counts['empty_turn']} with an empty turn, {counts['duplicates']} duplicates")
    print(f"kept {len(kept)} conversations, {turns} turns ({turns // 2} exchanges): "
          + ", ".join(f"{k}={v}" for k, v in per_file.items()))
    print(f"sha256 {digest}")
    if args.check and args.check != digest:
        print(f"ERROR: sha256 differs from --check {args.check}; nothing written", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(kept)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
