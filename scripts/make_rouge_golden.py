#!/usr/bin/env python3
"""Write tests/golden/instruct/rouge_l.json: ROUGE-L F-measures and tokens from Google's
rouge_score (``RougeScorer(["rougeL"], use_stemmer=False)``, the scorer Self-Instruct's filter
uses) for pairs of texts that exercise its tokenizer (case, digits, punctuation, non-ASCII
letters, empty texts) and its LCS.

    pip install rouge-score==0.1.2 && python3 scripts/make_rouge_golden.py
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

from rouge_score import rouge_scorer, tokenize

PAIRS = [
    ("Classify the sentiment of the review as positive or negative.",
     "Classify the movie review as positive or negative."),
    ("Write a haiku about the sea.", "Write a haiku about the sea today."),
    ("Tell whether the email is spam or not spam.", "Tell whether the fruit is sweet or sour."),
    ("Summarize the paragraph in one sentence.", "Summarize the paragraph in one sentence."),
    ("Give three tips for staying focused.", "List the ingredients needed to make pancakes."),
    ("", "anything at all"),
    ("!!! ... ???", "words here"),
    ("¿Qué hora es? Café, naïve, İstanbul, Straße.", "que hora es cafe naive istanbul strasse"),
    ("Convert 68 degrees Fahrenheit to Celsius (20C).", "convert 68 F to 20 c"),
    ("the the the cat", "the cat the"),
    ("a b c d e f g", "g f e d c b a"),
    ("It's a well-known fact: e-mail isn't spam!", "its a well known fact email is not spam"),
    ("Line one\nline two\ttabbed", "line ONE line TWO tabbed"),
    ("x" * 3 + " y z", "xxx y z w"),
]


def main() -> int:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cases = []
    for target, prediction in PAIRS:
        s = scorer.score(target, prediction)["rougeL"]
        cases.append({
            "target": target,
            "prediction": prediction,
            "precision": s.precision,
            "recall": s.recall,
            "fmeasure": s.fmeasure,
            "target_tokens": tokenize.tokenize(target, None),
        })
    out = Path(__file__).resolve().parent.parent / "tests/golden/instruct/rouge_l.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rouge_score_version": version("rouge-score"), "scorer": "rougeL, use_stemmer=False",
           "cases": cases}
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
