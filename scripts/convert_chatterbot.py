#!/usr/bin/env python3
"""Convert chatterbot-corpus 1.3.3 (English) into lorafuse's default dataset.

Run once; the output is committed as ``data/chatterbot_en.jsonl`` and embedded in the crate by
``src/train/data.rs`` (``default_records``).

The conversion follows ``SPEC.md`` (DATA section) of the golden reference exactly:

* files ``chatterbot_corpus/data/english/*.yml``, sorted by byte-wise file name, parsed with
  PyYAML ``safe_load``;
* each file's ``conversations`` list; each conversation ``[s0, ..., sn]`` gives pairs
  ``(s_i, s_{i+1})`` for ``i = 0, 2, 4, ...`` while ``i + 1 <= n`` (user turns at even positions);
* a conversation that is a bare string (``trivia.yml`` #13) is the one-turn conversation ``[s0]``
  (it yields no pair); it is never iterated as a sequence of characters;
* every value goes through ``str()`` and ``strip()``; pairs with an empty side are skipped;
* exact ``(question, answer)`` duplicates are dropped, keeping the first occurrence;
* the remaining pairs are indexed ``0..N-1`` in that order; ``index % 10 == 9`` is EVAL, the rest
  TRAIN (the split itself is applied in Rust by ``split_train_eval``; this script only checks
  the counts).

Output: one JSON object per pair, in index order, ``{"question": q, "answer": a}``, written with
``ensure_ascii=False`` as UTF-8, ``\\n`` line endings.

The script recomputes every statistic of the golden ``data_stats.json`` that depends only on the
corpus (N, train/eval counts, files, raw pairs per file, raw pairs before dedup, duplicates
removed, skipped empty pairs, non-list conversations, ``pairs_sha256``, first 3 train/eval pairs),
prints them, and exits non-zero (writing nothing) if any of them differs.

Usage::

    python3 scripts/convert_chatterbot.py \\
        --corpus-dir WHEEL_DIR/chatterbot_corpus/data/english \\
        [--stats tests/golden/smollm2/data_stats.json] \\
        [--out data/chatterbot_en.jsonl]

Requires PyYAML (``pip install pyyaml``; the reference used PyYAML 6.0.3).
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
DEFAULT_CORPUS = None  # the unpacked wheel's chatterbot_corpus/data/english (required)
DEFAULT_STATS = REPO_ROOT / "tests" / "golden" / "smollm2" / "data_stats.json"
DEFAULT_OUT = REPO_ROOT / "data" / "chatterbot_en.jsonl"


def conversation_turns(conv, file_name: str, conv_index: int, non_list: list) -> list:
    """The turns of one conversation as a list (SPEC clarification for non-list conversations)."""
    if isinstance(conv, list):
        return conv
    if isinstance(conv, str):
        # trivia.yml #13: a bare string is the one-turn conversation [s0]; never iterate its
        # characters.
        non_list.append(
            {"file": file_name, "conversation_index": conv_index, "value": conv}
        )
        return [conv]
    raise SystemExit(
        f"ERROR: {file_name} conversation #{conv_index} is a {type(conv).__name__}, "
        "neither a list nor a string; the spec does not cover it"
    )


def convert(corpus_dir: Path) -> dict:
    """Apply the SPEC DATA rules; return the pairs and the statistics."""
    files = sorted(
        (p.name for p in corpus_dir.iterdir() if p.name.endswith(".yml")),
        key=lambda name: name.encode("utf-8"),  # byte-wise order
    )
    if not files:
        raise SystemExit(f"ERROR: no *.yml files in {corpus_dir}")
    raw_per_file: dict[str, int] = {}
    non_list: list = []
    skipped_empty = 0
    seen: set = set()
    pairs: list = []
    raw_total = 0
    for name in files:
        with open(corpus_dir / name, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            raise SystemExit(f"ERROR: {name} has no `conversations` list")
        raw = 0
        for ci, conv in enumerate(convs):
            turns = conversation_turns(conv, name, ci, non_list)
            n = len(turns) - 1  # turns are s0..sn
            for i in range(0, n, 2):  # i = 0, 2, 4, ... while i + 1 <= n
                raw += 1
                q = str(turns[i]).strip()
                a = str(turns[i + 1]).strip()
                if not q or not a:
                    skipped_empty += 1
                    continue
                if (q, a) in seen:
                    continue
                seen.add((q, a))
                pairs.append((q, a))
        raw_per_file[name] = raw
        raw_total += raw

    h = hashlib.sha256()
    for q, a in pairs:
        h.update(q.encode("utf-8") + b"\x00" + a.encode("utf-8") + b"\x00")

    def rows(indices):
        return [
            {"index": i, "question": pairs[i][0], "answer": pairs[i][1]} for i in indices
        ]

    train_idx = [i for i in range(len(pairs)) if i % 10 != 9]
    eval_idx = [i for i in range(len(pairs)) if i % 10 == 9]
    # Duplicates removed = raw pairs that were neither skipped as empty nor kept.
    duplicates = raw_total - skipped_empty - len(pairs)
    stats = {
        "N": len(pairs),
        "train_count": len(train_idx),
        "eval_count": len(eval_idx),
        "files": files,
        "raw_pairs_before_dedup": raw_total,
        "raw_pairs_per_file": raw_per_file,
        "duplicates_removed": duplicates,
        "skipped_empty_pairs": skipped_empty,
        "non_list_conversations": non_list,
        "pairs_sha256": h.hexdigest(),
        "first_3_train_pairs": rows(train_idx[:3]),
        "first_3_eval_pairs": rows(eval_idx[:3]),
    }
    return {"pairs": pairs, "stats": stats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS, required=True)
    ap.add_argument("--stats", type=Path, default=DEFAULT_STATS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    result = convert(args.corpus_dir)
    stats = result["stats"]
    with open(args.stats, encoding="utf-8") as fh:
        golden = json.load(fh)

    print(f"corpus:   {args.corpus_dir}")
    print(f"golden:   {args.stats}")
    print(f"PyYAML:   {yaml.__version__}")
    mismatches = []
    for key, value in stats.items():
        ok = golden.get(key) == value
        if not ok:
            mismatches.append(key)
        shown = value
        if key in ("files", "first_3_train_pairs", "first_3_eval_pairs", "non_list_conversations"):
            shown = json.dumps(value, ensure_ascii=False)
        elif key == "raw_pairs_per_file":
            shown = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{'OK  ' if ok else 'DIFF'} {key} = {shown}")
        if not ok:
            print(f"     golden {key} = {json.dumps(golden.get(key), ensure_ascii=False)}")
    if mismatches:
        print(f"ERROR: {len(mismatches)} statistic(s) differ from {args.stats}: "
              f"{', '.join(mismatches)}; nothing written", file=sys.stderr)
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for q, a in result["pairs"]:
            fh.write(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n")
    # Read back what was written and check it is the same pair list.
    with open(tmp, encoding="utf-8", newline="\n") as fh:
        back = [json.loads(line) for line in fh]
    if [(r["question"], r["answer"]) for r in back] != result["pairs"]:
        os.unlink(tmp)
        print("ERROR: read-back of the JSONL differs from the pair list", file=sys.stderr)
        return 1
    os.replace(tmp, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({len(back)} lines, file sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
