#!/usr/bin/env python3
"""Build lorafuse's small preference set from chatterbot-corpus 1.3.3 (English).

Each record is ``{"prompt": question, "chosen": answer, "rejected": wrong}``: the question and
answer of one (user, bot) pair of the corpus, and as the rejected completion a fluent but wrong
answer: the answer to another question of the same topic file. It is what ``lorafuse dpo`` and
``lorafuse reward`` train on by default, in the default recipe's ChatML template.

Rules (deterministic; rerunning gives the same bytes):

* files ``chatterbot_corpus/data/english/*.yml``, sorted by byte-wise file name, parsed with
  PyYAML ``safe_load``; each file's ``conversations`` list, in order;
* pairs as the default dataset cuts them (``scripts/convert_chatterbot.py``): turns ``(s_i,
  s_{i+1})`` for even ``i``, every value through ``str()`` and ``strip()``, empty sides skipped,
  exact duplicates dropped keeping the first (over the whole corpus);
* within one file of n pairs, pair k's rejected answer is the answer of pair ``(k + n // 2 + j)
  % n`` for the smallest ``j >= 0`` whose answer is not an answer the corpus gives to pair k's
  question anywhere and whose question differs; a pair with no such answer (a file of one
  question) is left out;
* records in that order, one JSON object per line (``ensure_ascii=False``, UTF-8, ``\\n`` line
  endings); ``lorafuse`` splits them as it splits every dataset (index ``i % 10 == 9`` is eval).

Usage::

    pip download --no-deps chatterbot-corpus==1.3.3 && unzip chatterbot_corpus-1.3.3-*.whl -d wheel
    python3 scripts/build_preference_set.py --corpus-dir wheel/chatterbot_corpus/data/english \\
        [--out data/chatterbot_pref_en.jsonl] [--check SHA256]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_chat_set import corpus_files  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "chatterbot_pref_en.jsonl"


def pairs_by_file(corpus_dir: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    seen: set = set()
    out = []
    for name, convs in corpus_files(corpus_dir):
        pairs = []
        for conv in convs:
            turns = conv if isinstance(conv, list) else [conv]
            for i in range(0, len(turns) - 1, 2):
                q, a = str(turns[i]).strip(), str(turns[i + 1]).strip()
                if not q or not a or (q, a) in seen:
                    continue
                seen.add((q, a))
                pairs.append((q, a))
        out.append((name, pairs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", help="expected sha256 of the output; nothing written on a difference")
    args = ap.parse_args()
    by_file = pairs_by_file(args.corpus_dir)
    answers: dict[str, set] = {}
    for _, pairs in by_file:
        for q, a in pairs:
            answers.setdefault(q, set()).add(a)
    records, left_out, per_file = [], 0, {}
    for name, pairs in by_file:
        n = len(pairs)
        for k, (q, a) in enumerate(pairs):
            wrong = None
            for j in range(n):
                q2, a2 = pairs[(k + n // 2 + j) % n]
                if q2 != q and a2 not in answers[q]:
                    wrong = a2
                    break
            if wrong is None:
                left_out += 1
                continue
            records.append({"prompt": q, "chosen": a, "rejected": wrong})
            per_file[name] = per_file.get(name, 0) + 1
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    print(f"PyYAML {yaml.__version__}; {sum(len(p) for _, p in by_file)} pairs, "
          f"{len(records)} records, {left_out} left out")
    print(", ".join(f"{k}={v}" for k, v in per_file.items()))
    print(f"sha256 {digest}")
    if args.check and args.check != digest:
        print(f"ERROR: sha256 differs from --check {args.check}; nothing written", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
