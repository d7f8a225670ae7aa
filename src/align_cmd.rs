//! `lorafuse dpo`, `lorafuse reward` and `lorafuse score`: preference alignment from the
//! command line, over the library's `run_align`.

use super::*;
use lorafuse::io::apply_adapter_folder;
use lorafuse::train::align::{
    AlignJob, AlignMetrics, AlignReport, Objective, load_pairs, run_align,
};
use lorafuse::train::data::split_train_eval;
use lorafuse::train::dpo::{DpoConfig, DpoLossType};
use lorafuse::train::job::chat_template;
use lorafuse::train::preference::tokenize_preferences;
use lorafuse::train::reward::{RewardConfig, score_pairs};

pub(crate) fn dpo(a: DpoArgs) -> Result<()> {
    on_backend!(a.train.model.device, be => dpo_on(be, &a))
}

pub(crate) fn reward(a: RewardArgs) -> Result<()> {
    on_backend!(a.train.model.device, be => reward_on(be, &a))
}

pub(crate) fn score(a: ScoreArgs) -> Result<()> {
    on_backend!(a.model.device, be => score_on(be, &a))
}

fn dpo_on<B: Backend>(be: B, a: &DpoArgs) -> Result<()> {
    let job = AlignJob {
        job: finetune_job(&a.train, "runs/smollm2-dpo")?,
        start_adapter: a.adapter.clone(),
        objective: Objective::Dpo {
            config: DpoConfig {
                beta: a.beta,
                label_smoothing: a.label_smoothing,
                loss_type: a.loss_type.parse::<DpoLossType>()?,
            },
            precompute_ref: a.precompute_ref,
        },
    };
    run_and_print(&be, &job)
}

fn reward_on<B: Backend>(be: B, a: &RewardArgs) -> Result<()> {
    let job = AlignJob {
        job: finetune_job(&a.train, "runs/smollm2-reward")?,
        start_adapter: None,
        objective: Objective::Reward {
            config: RewardConfig {
                center_rewards_coefficient: a.center_rewards_coefficient,
            },
            score_init_std: a.score_init_std,
        },
    };
    run_and_print(&be, &job)
}

fn run_and_print<B: Backend>(be: &B, job: &AlignJob) -> Result<()> {
    let report: AlignReport =
        with_progress(job.job.recipe.train.steps, |ev| run_align(be, job, ev))?;
    let keys: &[&str] = match &report.metrics {
        AlignMetrics::Dpo(_) => &[
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "rewards/chosen",
            "rewards/rejected",
        ],
        AlignMetrics::Reward(_) => &["loss", "accuracy", "margin"],
    };
    if let [Some(b), Some(f)] = report.metrics.evals() {
        println!("eval (held-out pairs)      before      after");
        for k in keys {
            if let (Some(x), Some(y)) = (b.get(*k), f.get(*k)) {
                println!("  {k:<22} {x:>10.4} {y:>10.4}");
            }
        }
    }
    print_run(
        report.metrics.run(),
        report.n_base_params,
        report.saved,
        &job.job.out,
    );
    Ok(())
}

fn score_on<B: Backend>(be: B, a: &ScoreArgs) -> Result<()> {
    let (path, tok, mut model) = load_model(&be, a.model.model.as_deref(), None, &mut |l| {
        eprintln!("{l}")
    })?;
    apply_adapter_folder(&be, &mut model, &a.adapter)?;
    if model.score.is_none() {
        return Err(Error::arg(
            "adapter",
            format!(
                "{} is not a reward model (no score head: train one with `lorafuse reward`)",
                a.adapter.display()
            ),
        ));
    }
    let samples = load_pairs(a.data.as_deref(), BadRecordPolicy::Reject, &mut |_| {})?;
    let samples = match a.data {
        Some(_) => samples,
        None => split_train_eval(samples).1,
    };
    let template = chat_template(&path, &tok, a.chat_template.as_deref())?;
    // tokenize_preferences scores the last assistant turn whatever loss_on says.
    let settings = template
        .as_ref()
        .map(|t| ChatOptions::default().settings(t, &tok));
    let (pairs, _) = tokenize_preferences(&tok, settings.as_ref(), &samples, a.max_len, false)?;
    let (c, r) = score_pairs(&be, &model, &pairs, 16)?;
    if !a.quiet {
        println!("pair  r_chosen  r_rejected  margin");
        for (i, (x, y)) in c.iter().zip(&r).enumerate() {
            println!("{i:>4} {x:>9.4} {y:>11.4} {:>7.4}", x - y);
        }
    }
    let wins = c.iter().zip(&r).filter(|(x, y)| x > y).count();
    println!(
        "{} pairs: accuracy {:.4} (chosen scored higher in {wins}), mean margin {:.4}",
        c.len(),
        wins as f64 / c.len().max(1) as f64,
        c.iter().zip(&r).map(|(x, y)| x - y).sum::<f64>() / c.len().max(1) as f64
    );
    Ok(())
}
