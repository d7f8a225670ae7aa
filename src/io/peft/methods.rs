//! Every PEFT method in and out: LoRA/rsLoRA, DoRA (`use_dora`), VeRA and AdaLoRA.
//!
//! Key layout per method (PEFT 0.21.2 `get_peft_model_state_dict`, adapter name removed):
//!
//! | method | per module `base_model.model.<path>.` | shared |
//! |---|---|---|
//! | LoRA, rsLoRA | `lora_A.weight [r,in]`, `lora_B.weight [out,r]` | |
//! | DoRA | + `lora_magnitude_vector [out]` (no `.weight`) | |
//! | VeRA | `vera_lambda_b [out]`, `vera_lambda_d [r]` | `base_model.vera_A [r,max_in]`, `base_model.vera_B [max_out,r]` |
//! | AdaLoRA | `lora_A [kept,in]`, `lora_B [out,kept]`, `lora_E [kept,1]` | `rank_pattern` in the config |
//!
//! AdaLoRA: PEFT drops the masked ranks on save (`resize_state_dict_by_rank_pattern`) and, on
//! load, rebuilds each layer with `kept` ranks but `ranknum = init_r`
//! (`resize_modules_by_rank_pattern`), so the divisor of the scaling does not change.

use super::config::suffix_match;
use super::{
    AdapterConfig, AdapterTensor, CONFIG_NAME, KEY_PREFIX, SCORE_KEY, WEIGHTS_NAME,
    lora_layers_from_adapter, serialize_f32, write_dir_atomically,
};
use crate::adapter::{
    AdaLoraLayer, Adapter, BeftLayer, DoraLayer, Ia3Layer, Linear, MethodKind, VeraLayer,
    VeraShared,
};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::llama::{Llama, proj_path};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// Key of VeRA's shared `vera_A [r, max_in]`.
pub const VERA_A_KEY: &str = "base_model.vera_A";
/// Key of VeRA's shared `vera_B [max_out, r]`.
pub const VERA_B_KEY: &str = "base_model.vera_B";

/// The per-module key suffixes of a method, in [`Adapter::params`] order.
fn suffixes(method: MethodKind) -> &'static [&'static str] {
    match method {
        MethodKind::Lora => &["lora_A.weight", "lora_B.weight"],
        MethodKind::Dora => &["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"],
        MethodKind::Vera => &["vera_lambda_b", "vera_lambda_d"],
        MethodKind::AdaLora => &["lora_A", "lora_B", "lora_E"],
        MethodKind::Ia3 => &["ia3_l"],
        MethodKind::Beft => &["beft_bias"],
    }
}

fn method_name(method: MethodKind) -> &'static str {
    match method {
        MethodKind::Lora => "LoRA",
        MethodKind::Dora => "DoRA (use_dora: true)",
        MethodKind::Vera => "VeRA",
        MethodKind::AdaLora => "AdaLoRA",
        MethodKind::Ia3 => "IA3",
        MethodKind::Beft => "BEFT",
    }
}

/// Splits `base_model.model.<path>.<suffix>` for one of `sfx`: `(path, suffix index)`.
fn split_key<'k>(key: &'k str, sfx: &[&str]) -> Option<(&'k str, usize)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    sfx.iter().enumerate().find_map(|(i, s)| {
        rest.strip_suffix(s)
            .and_then(|p| p.strip_suffix('.'))
            .filter(|p| !p.is_empty())
            .map(|p| (p, i))
    })
}

fn check_data(key: &str, shape: &[usize], data: &[f32]) -> Result<()> {
    let n: usize = shape.iter().product();
    if data.len() != n {
        return Err(Error::arg(
            key,
            format!("{} values for shape {shape:?}, which needs {n}", data.len()),
        ));
    }
    if let Some(index) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: key.to_string(),
            index,
        });
    }
    Ok(())
}

/// The adapters built from a PEFT adapter by [`adapter_layers_from_adapter`].
#[derive(Clone, Debug)]
pub struct AdapterLayers<B: Backend> {
    /// The method of the adapter.
    pub method: MethodKind,
    /// `(module path, adapter)` per adapted module, in the order of the `modules` given.
    pub layers: Vec<(String, Adapter<B>)>,
    /// VeRA's shared projections (`None` for the other methods).
    pub vera_shared: Option<VeraShared<B>>,
}

/// Builds the adapters of a PEFT adapter of any method for a model of one's own: `modules`
/// lists the model's adaptable `nn.Linear` layers by module path (`fc1`,
/// `model.layers.0.self_attn.q_proj`). The generic form of [`lora_layers_from_adapter`]
/// (which it uses for plain LoRA/rsLoRA):
///
/// - DoRA (`use_dora: true`): `lora_A.weight`, `lora_B.weight` and `lora_magnitude_vector [out]`
///   per module → [`Adapter::Dora`] with the file's magnitude and `lora_alpha / r` scaling
///   (rsLoRA's with `use_rslora`);
/// - VeRA (`peft_type: VERA`): `base_model.vera_A [r, max_in]`, `base_model.vera_B [max_out, r]`
///   once (→ [`AdapterLayers::vera_shared`]) and `vera_lambda_b [out]`, `vera_lambda_d [r]`
///   per module → [`Adapter::Vera`];
/// - AdaLoRA (`peft_type: ADALORA`): `lora_A [kept, in]`, `lora_B [out, kept]`,
///   `lora_E [kept, 1]` with kept = the `true`s of the module's `rank_pattern` entry (init_r
///   without one) → [`Adapter::AdaLora`] with scaling `lora_alpha` (r if `lora_alpha <= 0`)
///   and `ranknum = init_r`, as PEFT's `resize_modules_by_rank_pattern`. A module whose ranks
///   are all masked (kept = 0) adds nothing and gets no adapter.
///
/// Errors (each names the key or setting): those of [`AdapterConfig::check_supported`]; no
/// tensor; a key that is not one of the method's (e.g. `lora_A.weight` in an AdaLoRA adapter);
/// a path not in `modules`; a module not in a list `target_modules` or in `exclude_modules`; a
/// key given twice; a module missing one of its tensors (DoRA without `lora_magnitude_vector`,
/// ...); a shape other than the above; VeRA without `base_model.vera_A`/`vera_B` (unless
/// saved with `save_projection: false`: then they are regenerated from `projection_prng_key`
/// as PEFT does, see [`VeraShared::init`]), or projections smaller than a module or of
/// another rank than r; an AdaLoRA `rank_pattern`
/// naming a module that is not in `modules`; a non-finite value.
pub fn adapter_layers_from_adapter<B: Backend>(
    be: &B,
    cfg: &AdapterConfig,
    tensors: &[AdapterTensor],
    modules: &[(String, &Linear<B>)],
) -> Result<AdapterLayers<B>> {
    let method = cfg.check_supported()?;
    if method == MethodKind::Lora {
        let layers = lora_layers_from_adapter(be, cfg, tensors, modules)?;
        return Ok(AdapterLayers {
            method,
            layers: layers
                .into_iter()
                .map(|(p, l)| (p, Adapter::Lora(l)))
                .collect(),
            vera_shared: None,
        });
    }
    if tensors.is_empty() {
        return Err(Error::arg("tensors", "the adapter holds no tensor"));
    }
    let name = method_name(method);
    let sfx = suffixes(method);
    let r = cfg.rank();
    let init_r = cfg.init_r();
    let index: HashMap<&str, usize> = modules
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    let excluded: Vec<&str> = match cfg.extra.get("exclude_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let pattern = if method == MethodKind::AdaLora {
        cfg.adalora_rank_pattern()?
    } else {
        BTreeMap::new()
    };
    for k in pattern.keys() {
        if !index.contains_key(k.as_str()) {
            return Err(Error::arg(
                format!("rank_pattern.{k}.lora_E"),
                format!("no module `{k}` in this model (from rank_pattern of {CONFIG_NAME})"),
            ));
        }
    }
    let kept = |path: &str| -> usize {
        pattern
            .get(path)
            .map_or(init_r, |k| k.iter().filter(|&&b| b).count())
    };
    let mut slots: Vec<Vec<Option<usize>>> = vec![vec![None; sfx.len()]; modules.len()];
    let mut shared: [Option<usize>; 2] = [None, None];
    for (ti, (key, shape, data)) in tensors.iter().enumerate() {
        check_data(key, shape, data)?;
        if method == MethodKind::Vera && (key == VERA_A_KEY || key == VERA_B_KEY) {
            let slot = &mut shared[usize::from(key == VERA_B_KEY)];
            if slot.is_some() {
                return Err(Error::arg(key.as_str(), "tensor key given twice"));
            }
            *slot = Some(ti);
            continue;
        }
        let (path, si) = split_key(key, sfx).ok_or_else(|| {
            let mut want: Vec<String> = sfx
                .iter()
                .map(|s| format!("`{KEY_PREFIX}<module>.{s}`"))
                .collect();
            if method == MethodKind::Vera {
                want.push(format!("`{VERA_A_KEY}`, `{VERA_B_KEY}`"));
            }
            Error::arg(
                key.as_str(),
                format!(
                    "unexpected tensor for this {name} adapter: expected {}",
                    want.join(", ")
                ),
            )
        })?;
        let &mi = index.get(path).ok_or_else(|| {
            let example = modules.first().map_or("", |(p, _)| p.as_str());
            Error::arg(
                key.as_str(),
                format!(
                    "no module `{path}` in this model to apply it to ({} adaptable modules, \
                     e.g. `{example}`)",
                    modules.len()
                ),
            )
        })?;
        if let Some(t) = &cfg.target_modules
            && t.matches(path) == Some(false)
        {
            return Err(Error::arg(
                key.as_str(),
                format!(
                    "module `{path}` is not in target_modules {} of {CONFIG_NAME} (PEFT would \
                     not load this tensor)",
                    serde_json::to_string(t).unwrap_or_default()
                ),
            ));
        }
        if excluded.iter().any(|n| suffix_match(path, n)) {
            return Err(Error::arg(
                key.as_str(),
                format!("module `{path}` is in exclude_modules of {CONFIG_NAME}"),
            ));
        }
        let slot = &mut slots[mi][si];
        if slot.is_some() {
            return Err(Error::arg(key.as_str(), "tensor key given twice"));
        }
        *slot = Some(ti);
        let base = modules[mi].1;
        let (inp, out) = (base.in_features(), base.out_features());
        let (expected, what): (Vec<usize>, String) = match (method, si) {
            (MethodKind::Dora, 0) => (
                vec![r, inp],
                format!("[r, in] with r = {r} from {CONFIG_NAME}"),
            ),
            (MethodKind::Dora, 1) => (
                vec![out, r],
                format!("[out, r] with r = {r} from {CONFIG_NAME}"),
            ),
            (MethodKind::Dora, _) => (vec![out], "[out]".into()),
            (MethodKind::Vera, 0) => (vec![out], "[out]".into()),
            (MethodKind::Vera, _) => (vec![r], format!("[r] with r = {r} from {CONFIG_NAME}")),
            (MethodKind::AdaLora, si) => {
                let k = kept(path);
                let src = if pattern.contains_key(path) {
                    format!("{k} kept ranks in rank_pattern `{path}.lora_E`")
                } else {
                    format!("init_r = {init_r} (no rank_pattern entry)")
                };
                match si {
                    0 => (vec![k, inp], format!("[kept, in] with {src}")),
                    1 => (vec![out, k], format!("[out, kept] with {src}")),
                    _ => (vec![k, 1], format!("[kept, 1] with {src}")),
                }
            }
            (MethodKind::Ia3, _) if super::additive::is_feedforward(cfg, path) => (
                vec![1, inp],
                "[1, in] (a feedforward_modules entry scales its input)".into(),
            ),
            (MethodKind::Ia3, _) => (vec![out, 1], "[out, 1]".into()),
            (MethodKind::Beft, _) => (vec![1, out], "[1, out]".into()),
            (MethodKind::Lora, _) => {
                unreachable!("plain LoRA goes through lora_layers_from_adapter")
            }
        };
        if shape[..] != expected[..] {
            return Err(Error::shape(
                key.as_str(),
                format!(
                    "{expected:?} ({} {what}; `{path}` is in {inp}, out {out})",
                    sfx[si]
                ),
                shape,
            ));
        }
    }
    let any_module = slots.iter().any(|s| s.iter().any(Option::is_some));
    if !any_module {
        return Err(Error::arg(
            "tensors",
            format!("the {name} adapter holds no per-module tensor"),
        ));
    }
    let vera_shared = if method == MethodKind::Vera {
        let used = modules
            .iter()
            .zip(&slots)
            .filter(|(_, s)| s.iter().any(Option::is_some));
        let max_in = used
            .clone()
            .map(|((_, l), _)| l.in_features())
            .max()
            .unwrap_or(0);
        let max_out = used.map(|((_, l), _)| l.out_features()).max().unwrap_or(0);
        let (key, saved) = cfg.vera_projection();
        if !saved && shared[0].is_none() && shared[1].is_none() {
            // save_projection=False: PEFT regenerates the projections from the key over the
            // largest targeted layer, and so does VeraShared::init, bit for bit.
            Some(VeraShared::init(be, r, max_in, max_out, key)?)
        } else {
            let missing = |key: &str| {
                Error::arg(
                    key,
                    format!(
                        "missing from {WEIGHTS_NAME}: a VeRA adapter saved with \
                         save_projection=True needs its shared projections `{VERA_A_KEY}` and \
                         `{VERA_B_KEY}`"
                    ),
                )
            };
            let ia = shared[0].ok_or_else(|| missing(VERA_A_KEY))?;
            let ib = shared[1].ok_or_else(|| missing(VERA_B_KEY))?;
            let (_, sa, da) = &tensors[ia];
            let (_, sb, db) = &tensors[ib];
            if sa.len() != 2 || sa[0] != r || sa[1] < max_in {
                return Err(Error::shape(
                    VERA_A_KEY,
                    format!("[r, max_in] with r = {r} from {CONFIG_NAME} and max_in >= {max_in}"),
                    sa,
                ));
            }
            if sb.len() != 2 || sb[1] != r || sb[0] < max_out {
                return Err(Error::shape(
                    VERA_B_KEY,
                    format!(
                        "[max_out, r] with r = {r} from {CONFIG_NAME} and max_out >= {max_out}"
                    ),
                    sb,
                ));
            }
            Some(VeraShared::from_tensors(
                be.upload(da, sa)?,
                be.upload(db, sb)?,
            )?)
        }
    } else {
        None
    };
    let scaling = if matches!(method, MethodKind::Dora) {
        cfg.scaling()?
    } else {
        0.0
    };
    let mut layers = Vec::new();
    for ((path, base), slot) in modules.iter().zip(&slots) {
        if slot.iter().all(Option::is_none) {
            continue;
        }
        if let Some(miss) = slot.iter().position(Option::is_none) {
            let have = slot.iter().flatten().next().copied().unwrap_or(0);
            let present: Vec<&str> = sfx
                .iter()
                .zip(slot)
                .filter(|(_, s)| s.is_some())
                .map(|(n, _)| *n)
                .collect();
            return Err(Error::arg(
                tensors[have].0.as_str(),
                format!(
                    "module `{path}` has {} but no {} (expected `{KEY_PREFIX}{path}.{}` in this \
                     {name} adapter)",
                    present.join(", "),
                    sfx[miss],
                    sfx[miss]
                ),
            ));
        }
        let t = |i: usize| -> Result<crate::backend::Tensor<B>> {
            let (_, s, d) = &tensors[slot[i].expect("all present")];
            be.upload(d, s)
        };
        let key0 = tensors[slot[0].expect("all present")].0.as_str();
        let wrap = |e: Error| Error::arg(key0, format!("module `{path}`: {e}"));
        let adapter = match method {
            MethodKind::Dora => Adapter::Dora(
                DoraLayer::from_factors(be, base, t(0)?, t(1)?, scaling, Some(t(2)?))
                    .map_err(wrap)?,
            ),
            MethodKind::Vera => {
                let sh = vera_shared.as_ref().expect("VeRA shared built above");
                Adapter::Vera(VeraLayer::from_vectors(sh, base, t(1)?, t(0)?).map_err(wrap)?)
            }
            MethodKind::AdaLora => {
                let k = kept(path);
                if k == 0 {
                    continue;
                }
                let scaling = AdaLoraLayer::<B>::scaling_for(cfg.alpha() as f32, k);
                Adapter::AdaLora(
                    AdaLoraLayer::from_factors(base, t(0)?, t(1)?, t(2)?, scaling, init_r as f32)
                        .map_err(wrap)?,
                )
            }
            MethodKind::Ia3 => Adapter::Ia3(
                Ia3Layer::from_vector(t(0)?, base, super::additive::is_feedforward(cfg, path))
                    .map_err(wrap)?,
            ),
            MethodKind::Beft => Adapter::Beft(BeftLayer::from_bias(t(0)?, base).map_err(wrap)?),
            MethodKind::Lora => unreachable!("handled above"),
        };
        layers.push((path.clone(), adapter));
    }
    Ok(AdapterLayers {
        method,
        layers,
        vera_shared,
    })
}

/// Attaches a PEFT adapter of any method ([`adapter_layers_from_adapter`]) to a Llama model:
/// every projection the adapter names gets its [`Adapter`]; projections it does not name keep
/// what they had (call [`Llama::remove_adapters`] first for a clean model). A VeRA adapter also
/// sets [`Llama::vera_shared`] to its projections. transformers' Llama and lorafuse's share q/k
/// row order, so PEFT tensors apply unchanged.
///
/// Errors, leaving the model untouched: those of [`adapter_layers_from_adapter`] (and, for
/// plain LoRA, of [`lora_layers_from_adapter`]).
pub fn apply_adapter<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    cfg: &AdapterConfig,
    tensors: &[AdapterTensor],
) -> Result<()> {
    // A reward model's head (PEFT's modules_to_save of a SEQ_CLS adapter) rides along.
    let (head, rest): (Vec<&AdapterTensor>, Vec<&AdapterTensor>) =
        tensors.iter().partition(|(k, _, _)| k == SCORE_KEY);
    if let Some((key, shape, data)) = head.first() {
        if !cfg.is_seq_cls_head() {
            return Err(Error::arg(
                key.as_str(),
                "a score head in an adapter whose config is not task_type SEQ_CLS with                  modules_to_save [classifier, score]",
            ));
        }
        let rest: Vec<AdapterTensor> = rest.into_iter().cloned().collect();
        let before = model.score.take();
        let r = model
            .set_score_head(be, data, shape)
            .and_then(|()| apply_adapter(be, model, cfg, &rest));
        if r.is_err() {
            model.score = before;
        }
        return r;
    }
    if cfg.peft_type == "LN_TUNING" {
        return super::additive::apply_ln_tuning(be, model, tensors);
    }
    if super::additive::prompt_method(cfg).is_some() {
        return super::additive::apply_prompt(be, model, cfg, tensors);
    }
    let mut slots = HashMap::new();
    let mut modules = Vec::new();
    for (l, block) in model.layers.iter().enumerate() {
        for (p, proj) in block.proj.iter().enumerate() {
            let path = proj_path(l, p);
            slots.insert(path.clone(), (l, p));
            modules.push((path, &proj.base));
        }
    }
    let built = adapter_layers_from_adapter(be, cfg, tensors, &modules)?;
    for (path, layer) in built.layers {
        if let Some(&(l, p)) = slots.get(&path) {
            model.layers[l].proj[p].adapter = Some(layer);
        }
    }
    if let Some(sh) = built.vera_shared {
        model.vera_shared = Some(sh);
    }
    Ok(())
}

/// What [`llama_adapter_export`] returns: the tensors and the AdaLoRA rank pattern (module path
/// → one bool per rank, `true` = kept).
pub type AdapterExport = (Vec<AdapterTensor>, BTreeMap<String, Vec<bool>>);

/// Which AdaLoRA ranks [`llama_adapter_export`] treats as masked (and so drops, as PEFT does).
#[derive(Clone, Copy, Debug)]
pub enum AdaLoraMask<'a> {
    /// None: every rank is saved and `rank_pattern` stays empty (PEFT before the first
    /// masking step, `tinit`).
    KeepAll,
    /// A rank whose `lora_E` entry is exactly 0 is masked (what PEFT's masking leaves behind).
    /// Note that a fresh AdaLoRA layer has E = 0 everywhere.
    ZeroE,
    /// An explicit pattern keyed by module path (`model.layers.0.self_attn.q_proj`), one bool per
    /// rank (`true` = kept), e.g. a RankAllocator's; modules it does not name keep every rank.
    Pattern(&'a BTreeMap<String, Vec<bool>>),
}

/// Drops the ranks of one AdaLoRA module whose `keep` entry is false from its tensors among
/// `tensors` (found through `pos`, key → index): the rows of `lora_A`/`lora_E` and the columns
/// of `lora_B`, as PEFT's `resize_state_dict_by_rank_pattern`. `keep` has one entry per rank.
pub(crate) fn drop_masked_ranks(
    tensors: &mut [AdapterTensor],
    pos: &HashMap<String, usize>,
    path: &str,
    keep: &[bool],
) {
    let idx: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
    for (suffix, rows) in [("lora_A", true), ("lora_E", true), ("lora_B", false)] {
        let key = format!("{KEY_PREFIX}{path}.{suffix}");
        let Some(&ti) = pos.get(&key) else { continue };
        let (_, shape, data) = &mut tensors[ti];
        if rows {
            let cols = shape[1];
            *data = idx
                .iter()
                .flat_map(|&i| data[i * cols..(i + 1) * cols].iter().copied())
                .collect();
            shape[0] = idx.len();
        } else {
            let (out, rr) = (shape[0], shape[1]);
            *data = (0..out)
                .flat_map(|o| idx.iter().map(move |&i| o * rr + i))
                .map(|j| data[j])
                .collect();
            shape[1] = idx.len();
        }
    }
}

/// [`super::llama_adapter_tensors`] with AdaLoRA's masked ranks dropped, as PEFT's
/// `get_peft_model_state_dict` does (`resize_state_dict_by_rank_pattern`): for each masked
/// AdaLoRA module, the rows of `lora_A`/`lora_E` and the columns of `lora_B` of the masked
/// ranks are removed. Also returns the rank pattern (module path → kept ranks, over the full
/// rank) to write into the config (`cfg.rank_pattern = Some(rank_pattern_json(&p))`, or
/// [`super::AdaLoraOptions::rank_pattern`]); empty for `KeepAll` and for models without AdaLoRA.
///
/// Errors: a `Pattern` entry whose length is not the module's rank, or that names no AdaLoRA
/// module; a download failure.
pub fn llama_adapter_export<B: Backend>(
    be: &B,
    model: &Llama<B>,
    mask: AdaLoraMask<'_>,
) -> Result<AdapterExport> {
    let mut tensors = super::llama_adapter_tensors(be, model)?;
    let mut pattern = BTreeMap::new();
    if matches!(mask, AdaLoraMask::KeepAll) {
        return Ok((tensors, pattern));
    }
    let pos: HashMap<String, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, (k, _, _))| (k.clone(), i))
        .collect();
    let mut seen = HashSet::new();
    for (l, block) in model.layers.iter().enumerate() {
        for (p, proj) in block.proj.iter().enumerate() {
            let Some(Adapter::AdaLora(layer)) = &proj.adapter else {
                continue;
            };
            let path = proj_path(l, p);
            let r = layer.r();
            let keep: Vec<bool> = match mask {
                AdaLoraMask::KeepAll => unreachable!("returned above"),
                AdaLoraMask::ZeroE => be
                    .download(&layer.lora_e)?
                    .iter()
                    .map(|&e| e != 0.0)
                    .collect(),
                AdaLoraMask::Pattern(pat) => match pat.get(&path) {
                    Some(k) if k.len() == r => {
                        seen.insert(path.clone());
                        k.clone()
                    }
                    Some(k) => {
                        return Err(Error::arg(
                            format!("rank_pattern.{path}"),
                            format!("{} entries, the module has rank {r}", k.len()),
                        ));
                    }
                    None => continue,
                },
            };
            drop_masked_ranks(&mut tensors, &pos, &path, &keep);
            pattern.insert(path, keep);
        }
    }
    if let AdaLoraMask::Pattern(pat) = mask
        && let Some(k) = pat.keys().find(|k| !seen.contains(*k))
    {
        return Err(Error::arg(
            format!("rank_pattern.{k}"),
            "names no AdaLoRA module of this model",
        ));
    }
    Ok((tensors, pattern))
}

/// Writes a PEFT adapter folder of any method (LoRA/rsLoRA/DoRA, VeRA, AdaLoRA) in PEFT's
/// layout: `adapter_config.json` ([`AdapterConfig::to_peft_json`], every key PEFT writes for
/// the `peft_type`, `inference_mode: true`) and `adapter_model.safetensors`; atomic, like
/// [`super::save_lora_adapter`] (which is this for `LORA` configs only).
///
/// Errors, before anything is written: a `peft_type` other than `LORA`, `VERA`, `ADALORA`
/// (for VeRA/AdaLoRA also [`AdapterConfig::check_supported`]'s errors, e.g. VeRA with
/// `save_projection: false`: lorafuse's projections cannot be regenerated by PEFT); no tensor;
/// an empty or repeated key; a data length that disagrees with the shape; a non-finite value;
/// a rank that disagrees with the config: LoRA `lora_A`/`lora_B` vs r (when `rank_pattern` is
/// empty), AdaLoRA `lora_A`/`lora_B`/`lora_E` vs the kept ranks of `rank_pattern` (init_r
/// without an entry), VeRA `vera_lambda_d` and the projections vs r; VeRA without
/// `base_model.vera_A`/`vera_B`; then the folder errors of [`super::save_lora_adapter`].
pub fn save_adapter(dir: &Path, cfg: &AdapterConfig, tensors: &[AdapterTensor]) -> Result<()> {
    save_checked(dir, cfg, tensors)
}

/// The checks and the write of [`save_adapter`].
pub(super) fn save_checked(
    dir: &Path,
    cfg: &AdapterConfig,
    tensors: &[AdapterTensor],
) -> Result<()> {
    match cfg.peft_type.as_str() {
        "LORA" => {
            cfg.scaling()?;
        }
        "VERA" | "ADALORA" | "IA3" | "BEFT" => {
            cfg.check_supported()?;
        }
        t if super::additive::ADDITIVE_TYPES.contains(&t) => {}
        t => {
            return Err(Error::arg(
                "peft_type",
                format!(
                    "lorafuse saves LORA, VERA, ADALORA, IA3, BEFT, LN_TUNING, PROMPT_TUNING, \
                     P_TUNING and PREFIX_TUNING adapters, got peft_type `{t}`"
                ),
            ));
        }
    }
    if tensors.is_empty() {
        return Err(Error::arg("tensors", "no adapter tensor to save"));
    }
    let r = cfg.rank();
    let init_r = cfg.init_r();
    let pattern = if cfg.peft_type == "ADALORA" {
        cfg.adalora_rank_pattern()?
    } else {
        BTreeMap::new()
    };
    let lora_rank_checked = cfg.rank_pattern.as_ref().is_none_or(|p| p.is_empty());
    let mut seen = HashSet::new();
    let (mut has_a, mut has_b) = (false, false);
    for (key, shape, data) in tensors {
        if key.is_empty() {
            return Err(Error::arg("tensors", "empty tensor key"));
        }
        if !seen.insert(key.as_str()) {
            return Err(Error::arg(key.as_str(), "tensor key given twice"));
        }
        check_data(key, shape, data)?;
        // (position of the rank in the shape, the expected rank, where it comes from)
        let check: Option<(usize, usize, String)> = match cfg.peft_type.as_str() {
            "LORA" if lora_rank_checked => {
                match split_key(key, &["lora_A.weight", "lora_B.weight"]) {
                    Some((_, 0)) => Some((0, r, format!("[r, in] with rank r = {r}"))),
                    Some((_, _)) => Some((1, r, format!("[out, r] with rank r = {r}"))),
                    None => None,
                }
            }
            "ADALORA" => split_key(key, &["lora_A", "lora_B", "lora_E"]).map(|(path, si)| {
                let k = pattern
                    .get(path)
                    .map_or(init_r, |p| p.iter().filter(|&&b| b).count());
                let src = if pattern.contains_key(path) {
                    format!("{k} kept ranks of rank_pattern `{path}.lora_E`")
                } else {
                    format!("init_r = {init_r}")
                };
                match si {
                    0 => (0, k, format!("[kept, in] with {src}")),
                    1 => (1, k, format!("[out, kept] with {src}")),
                    _ => (0, k, format!("[kept, 1] with {src}")),
                }
            }),
            "VERA" if key == VERA_A_KEY => {
                has_a = true;
                Some((0, r, format!("[r, max_in] with r = {r}")))
            }
            "VERA" if key == VERA_B_KEY => {
                has_b = true;
                Some((1, r, format!("[max_out, r] with r = {r}")))
            }
            "VERA" => {
                split_key(key, &["vera_lambda_d"]).map(|_| (0, r, format!("[r] with r = {r}")))
            }
            _ => None,
        };
        if let Some((dim, want, what)) = check {
            let is_e = key.ends_with(".lora_E");
            let ok = if key.ends_with(".vera_lambda_d") {
                shape.len() == 1 && shape[0] == want
            } else {
                shape.len() == 2 && shape[dim] == want && (!is_e || shape[1] == 1)
            };
            if !ok {
                return Err(Error::shape(
                    key.as_str(),
                    format!("{what} from the config"),
                    shape,
                ));
            }
        }
    }
    if cfg.peft_type == "VERA" && !(has_a && has_b) {
        let key = if has_a { VERA_B_KEY } else { VERA_A_KEY };
        return Err(Error::arg(
            key,
            "a VeRA adapter is saved with its shared projections base_model.vera_A and \
             base_model.vera_B (save_projection: true); lorafuse's cannot be regenerated by PEFT",
        ));
    }
    let mut cfg = cfg.clone();
    cfg.inference_mode = true;
    let json = cfg.to_peft_json()?;
    let st = serialize_f32(dir, tensors)?;
    write_dir_atomically(dir, &[(CONFIG_NAME, json.as_bytes()), (WEIGHTS_NAME, &st)])
}
