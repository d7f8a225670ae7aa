//! Self-Instruct and Evol-Instruct (`lorafuse::instruct`): ROUGE-L against Google's
//! `rouge_score` (golden/instruct/rouge_l.json), the parsers and every filter with a scripted
//! model whose answers are known (exact counts), and both commands end to end on the tiny GGUF
//! (a random model: what is tested is that the pipeline runs, counts add up and a seed
//! reproduces the output).

use lorafuse::Result;
use lorafuse::instruct::evol_instruct::{
    EvolConfig, copies_prompt, evol_instruct, is_refusal, only_stop_words, read_instructions,
};
use lorafuse::instruct::rouge::{rouge_l, tokens};
use lorafuse::instruct::self_instruct::{
    Instance, SelfInstructConfig, instruction_prompt, parse_input_first, parse_instructions,
    parse_output_first, read_seed_tasks, self_instruct,
};
use lorafuse::instruct::{AlpacaRecord, Complete, Completion};
use std::path::PathBuf;

mod common;
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

fn seed_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/seed_tasks.jsonl")
}

#[test]
fn rouge_l_matches_rouge_score() {
    let path = common::golden_file("instruct/rouge_l.json");
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let (t, p) = (
            c["target"].as_str().unwrap(),
            c["prediction"].as_str().unwrap(),
        );
        let want = c["fmeasure"].as_f64().unwrap();
        let got = rouge_l(t, p);
        assert!(
            (got - want).abs() < 1e-12,
            "{t:?} / {p:?}: {got} against rouge_score's {want}"
        );
        let want_tokens: Vec<String> = c["target_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tokens(t), want_tokens, "tokens of {t:?}");
    }
}

/// A model whose answers are a function of the prompt (and of how many times it was asked).
struct Scripted<F: FnMut(&str, usize) -> Completion> {
    answer: F,
    calls: usize,
    prompts: Vec<String>,
}

impl<F: FnMut(&str, usize) -> Completion> Complete for Scripted<F> {
    fn complete(&mut self, prompts: &[String], _max_new: usize) -> Result<Vec<Completion>> {
        self.calls += 1;
        self.prompts.extend(prompts.iter().cloned());
        Ok(prompts
            .iter()
            .map(|p| (self.answer)(p, self.calls))
            .collect())
    }
}

fn done(s: &str) -> Completion {
    Completion {
        text: s.into(),
        finished: true,
    }
}

#[test]
fn parsers_read_tasks_and_instances() {
    assert_eq!(
        parse_instructions(
            " First one.\nstill first\nTask 10: Second.\n\nTask 11:Third\nTask x: not a marker"
        ),
        vec![
            "First one.\nstill first",
            "Second.",
            "Third\nTask x: not a marker"
        ]
    );
    let p = instruction_prompt(&["a b c", "d e f"]);
    assert_eq!(
        p,
        "Come up with a series of tasks:\n\nTask 1: a b c\nTask 2: d e f\nTask 3:"
    );
    assert_eq!(
        parse_input_first(
            "Example 1\nInput: x\nOutput: y\nExample 2\nOutput: z\nmore z\nTask: next\nOutput: no"
        ),
        vec![
            Instance {
                input: "x".into(),
                output: "y".into()
            },
            Instance {
                input: "".into(),
                output: "z\nmore z".into()
            },
        ]
    );
    assert_eq!(
        parse_input_first("Output: just this"),
        vec![Instance {
            input: "".into(),
            output: "just this".into()
        }]
    );
    assert_eq!(
        parse_output_first(
            "Class label: Yes\nInput: a\nClass label: No\nInput: b\nTask: t\nClass label: X"
        ),
        vec![
            Instance {
                input: "a".into(),
                output: "Yes".into()
            },
            Instance {
                input: "b".into(),
                output: "No".into()
            },
        ]
    );
    let seeds = read_seed_tasks(&seed_file()).unwrap();
    assert_eq!(seeds.len(), 20);
    assert_eq!(seeds.iter().filter(|s| s.is_classification).count(), 7);
}

#[test]
fn self_instruct_filters_and_counts_every_candidate() {
    let seeds = read_seed_tasks(&seed_file()).unwrap();
    let round1 = " Write a haiku about the sea.\nTask 10: Draw a picture of a cat.\nTask 11: Hi\n\
                  Task 12: Classify the movie review as positive or negative.\n\
                  Task 13: ¿Qué hora es ahora mismo?\nTask 14: Write a haiku about the sea today.\n\
                  Task 15: Summarize the paragraph in one sentence.";
    let round2 =
        " Tell whether the fruit is sweet or sour.\nTask 10: Name a color that starts with";
    let script = |p: &str, call: usize| -> Completion {
        if p.starts_with("Come up with a series of tasks:") {
            if call == 1 {
                done(round1)
            } else {
                Completion {
                    text: round2.into(),
                    finished: false,
                }
            }
        } else if p.starts_with("Can the following task") {
            done(if p.ends_with("sweet or sour.\nIs it classification?") {
                " Yes"
            } else {
                " No"
            })
        } else if p.starts_with("Come up with examples") {
            done(
                "Example 1\nOutput: Waves fold on the shore\nExample 2\nOutput: Waves fold on the shore\n\
                  Example 3\nInput: sea\nOutput: Sea\nExample 4\nOutput:\n",
            )
        } else {
            assert!(p.starts_with("Given the classification task"), "{p}");
            done(
                "Class label: Sweet\nInput: Mango\nClass label: Sour\nInput: Lemon\nTask: more\nClass label: X",
            )
        }
    };
    let cfg = SelfInstructConfig {
        num_instructions: 2,
        prompts_per_round: 2,
        ..SelfInstructConfig::default()
    };
    let run = || {
        let mut m = Scripted {
            answer: script,
            calls: 0,
            prompts: vec![],
        };
        let mut seen = Vec::new();
        let (records, report) = self_instruct(&mut m, &seeds, &cfg, &mut |n| seen.push(n)).unwrap();
        (records, report, seen, m.prompts)
    };
    let (records, r, seen, prompts) = run();
    assert_eq!(seen, vec![1, 2]);
    assert_eq!(r.rounds, 2);
    // Round 1: 2 x 7 items. The first copy keeps the haiku; keywords (draw, picture), "Hi",
    // the Spanish start, and ROUGE-L > 0.7 (the movie review: 0.78 with a seed; the second
    // haiku: 0.92; a seed verbatim: 1) remove the rest, and the second copy's haiku is now a
    // duplicate of the pool's. Round 2: 2 x 2 items, the last of each cut by the token limit,
    // the second copy's first a duplicate.
    assert_eq!(r.candidates, 14 + 4);
    assert_eq!(
        (r.keyword, r.too_short, r.bad_start, r.too_long),
        (2, 2, 2, 0)
    );
    assert_eq!(r.too_similar, 3 + 4 + 1);
    assert_eq!(r.cut_off, 2);
    assert_eq!((r.instructions, r.classification), (2, 1));
    // The haiku's four examples: one kept, a duplicate, input = output (case aside), empty.
    assert_eq!(
        (r.duplicate_instances, r.input_is_output, r.empty_output),
        (1, 1, 1)
    );
    assert_eq!(r.no_instances, 0);
    assert_eq!(r.instances, 3);
    let rec = |i: &str, x: &str, o: &str| AlpacaRecord {
        instruction: i.into(),
        input: x.into(),
        output: o.into(),
    };
    assert_eq!(
        records,
        vec![
            rec(
                "Write a haiku about the sea.",
                "",
                "Waves fold on the shore"
            ),
            rec("Tell whether the fruit is sweet or sour.", "Mango", "Sweet"),
            rec("Tell whether the fruit is sweet or sour.", "Lemon", "Sour"),
        ]
    );
    // Round 2's generation prompts show the machine-written task next to 7 seeds.
    let asked: Vec<&String> = prompts
        .iter()
        .filter(|p| p.starts_with("Come up with a series"))
        .collect();
    assert_eq!(asked.len(), 4);
    for p in &asked {
        assert!(p.ends_with("Task 9:"), "{p}");
    }
    assert!(
        asked[2..]
            .iter()
            .all(|p| p.contains(": Write a haiku about the sea.\n"))
    );
    assert!(!asked[0].contains("haiku"));
    // The same seed gives the same prompts and records.
    let (records2, r2, _, prompts2) = run();
    let t = r.table();
    assert_eq!((records2, r2, prompts2), (records, r, prompts));
    assert!(
        t.contains("ROUGE-L") && t.contains("instances written"),
        "{t}"
    );
}

fn given(p: &str) -> &str {
    let start = ["#The Given Prompt#:\n", "#Given Prompt#:\n"]
        .iter()
        .find_map(|m| p.rfind(m).map(|i| i + m.len()))
        .expect("a rewriting prompt");
    let rest = &p[start..];
    &rest[..rest.find("\n#").unwrap()]
}

#[test]
fn evol_instruct_eliminates_by_the_papers_rules() {
    let insts: Vec<String> = [
        "Name a fruit.",
        "Describe rain.",
        "Count to three.",
        "Say hi.",
        "List two colors.",
        "Tell a joke.",
    ]
    .map(String::from)
    .to_vec();
    let script = |p: &str, _call: usize| -> Completion {
        if p.starts_with("I want you act as a Prompt") {
            assert!(p.ends_with("#Rewritten Prompt#:\n") || p.ends_with("#Created Prompt#:\n"));
            done(match given(p) {
                "Name a fruit." => "Name a tropical fruit that is yellow.",
                "Name a tropical fruit that is yellow." => {
                    "Name a tropical fruit that is yellow and sweet."
                }
                "Describe rain." => "#Rewritten Prompt#: Describe rain in detail.",
                "Count to three." => " count to  THREE. ",
                "Say hi." => "  ",
                "List two colors." => "List two warm colors.",
                "Tell a joke." => "Tell a joke about cats.",
                other => panic!("unexpected instruction {other:?}"),
            })
        } else if p.starts_with("Here are two Instructions") {
            done(
                if p.contains("The Second Prompt: Name a tropical fruit that is yellow and sweet.")
                {
                    "Equal"
                } else {
                    "Not Equal"
                },
            )
        } else {
            done(match p {
                "Name a tropical fruit that is yellow." => "Banana.",
                "List two warm colors." => "Sorry, I cannot list colors.",
                "Tell a joke about cats." => "It is the...",
                other => panic!("unexpected answer prompt {other:?}"),
            })
        }
    };
    let cfg = EvolConfig {
        generations: 2,
        batch_size: 4,
        ..EvolConfig::default()
    };
    let mut m = Scripted {
        answer: script,
        calls: 0,
        prompts: vec![],
    };
    let mut seen = Vec::new();
    let (records, r) = evol_instruct(&mut m, &insts, &cfg, &mut |n| seen.push(n)).unwrap();
    assert_eq!(seen, vec![4, 6, 10, 12]);
    assert_eq!(r.generations, 2);
    assert_eq!(r.attempted.iter().sum::<usize>(), 12);
    assert_eq!(r.kept.iter().sum::<usize>(), 1);
    assert_eq!(
        (
            r.empty,
            r.copied_prompt,
            r.no_information_gain,
            r.refusal,
            r.empty_answer
        ),
        (2, 2, 3, 2, 2)
    );
    assert_eq!(
        records,
        vec![AlpacaRecord {
            instruction: "Name a tropical fruit that is yellow.".into(),
            input: String::new(),
            output: "Banana.".into(),
        }]
    );
    assert!(is_refusal("I'm sorry, but no.") && !is_refusal(&"sorry ".repeat(80)));
    assert!(only_stop_words("Is it? The...") && !only_stop_words("Bananas are yellow."));
    assert!(copies_prompt("As the Given Prompt says") && !copies_prompt("A prompt"));
}

#[test]
fn the_commands_run_on_a_model_and_a_seed_reproduces_them() {
    let s = tiny_setup("lorafuse-instruct");
    let out = s.dir.join("self.jsonl");
    let report = s.dir.join("self-report.json");
    let si = |out: &std::path::Path| {
        run_lorafuse(
            &s.cache,
            &[
                "self-instruct",
                "--model",
                p(&s.gguf),
                "--seed-tasks",
                p(&seed_file()),
                "--num-instructions",
                "2",
                "--max-rounds",
                "2",
                "--prompts-per-round",
                "2",
                "--max-new-tokens",
                "12",
                "--temperature",
                "1.0",
                "--top-p",
                "1.0",
                "--out",
                p(out),
                "--report",
                p(&report),
            ],
        )
    };
    let o = si(&out);
    assert_ok(&o, "self-instruct");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(n("rounds"), 2);
    assert!(n("candidates") > 0, "{r}");
    // Every candidate is accounted for: filtered, cut off, or kept for instances.
    let filtered = [
        "too_short",
        "too_long",
        "keyword",
        "bad_start",
        "too_similar",
    ]
    .iter()
    .map(|k| n(k))
    .sum::<u64>();
    assert!(filtered + n("cut_off") <= n("candidates"), "{r}");
    assert!(
        n("instructions") + n("no_instances") <= n("candidates") - filtered,
        "{r}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count() as u64, n("instances"));
    for line in text.lines() {
        let rec: AlpacaRecord = serde_json::from_str(line).unwrap();
        assert!(!rec.output.trim().is_empty());
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("instructions generated"), "{stdout}");
    // Into a folder that does not exist yet (created before any generation).
    let again = s.dir.join("new").join("folder").join("self2.jsonl");
    assert_ok(&si(&again), "self-instruct again");
    assert_eq!(std::fs::read(&again).unwrap(), text.as_bytes());

    // Evol-Instruct over an Alpaca file.
    let insts = s.dir.join("insts.jsonl");
    std::fs::write(
        &insts,
        "{\"instruction\": \"Name a fruit.\", \"input\": \"\", \"output\": \"Apple.\"}\n\
         {\"instruction\": \"Add the numbers.\", \"input\": \"2 and 3\", \"output\": \"5\"}\n",
    )
    .unwrap();
    assert_eq!(
        read_instructions(&insts).unwrap(),
        vec!["Name a fruit.", "Add the numbers.\n\n2 and 3"]
    );
    let evo = |out: &std::path::Path| {
        run_lorafuse(
            &s.cache,
            &[
                "evol-instruct",
                "--model",
                p(&s.gguf),
                "--instructions",
                p(&insts),
                "--generations",
                "2",
                "--max-instruction-tokens",
                "8",
                "--max-response-tokens",
                "8",
                "--out",
                p(out),
                "--report",
                p(&report),
            ],
        )
    };
    let eout = s.dir.join("evol.jsonl");
    assert_ok(&evo(&eout), "evol-instruct");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let sum = |k: &str| {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(sum("attempted"), 4);
    let eliminated: u64 = [
        "empty",
        "copied_prompt",
        "no_information_gain",
        "refusal",
        "empty_answer",
    ]
    .iter()
    .map(|k| r[k].as_u64().unwrap())
    .sum();
    assert_eq!(eliminated + sum("kept"), 4, "{r}");
    let text = std::fs::read_to_string(&eout).unwrap();
    assert_eq!(text.lines().count() as u64, sum("kept"));
    let again = s.dir.join("evol2.jsonl");
    assert_ok(&evo(&again), "evol-instruct again");
    assert_eq!(std::fs::read(&again).unwrap(), text.as_bytes());

    // Bad input: a missing seed file, an output that is a folder, an instruction without text.
    let o = run_lorafuse(
        &s.cache,
        &[
            "self-instruct",
            "--model",
            p(&s.gguf),
            "--seed-tasks",
            "missing-seeds.jsonl",
            "--out",
            p(&out),
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing-seeds.jsonl"));
    let o = run_lorafuse(
        &s.cache,
        &[
            "evol-instruct",
            "--model",
            p(&s.gguf),
            "--instructions",
            p(&insts),
            "--out",
            p(&s.dir),
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a folder"));
    std::fs::write(&insts, "{\"output\": \"no instruction\"}\n").unwrap();
    let e = read_instructions(&insts).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("instruction"), "{e}");
    let _ = std::fs::remove_dir_all(&s.dir);
}
