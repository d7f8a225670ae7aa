//! PEFT adapter folders from candle: [`save_peft`] writes what PEFT's `save_pretrained` writes
//! for the adapted modules of a model, [`load_peft`] reads such a folder (written here, by
//! lorafuse's trainer, or by PEFT) into the layers' tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::adapted::AdaptedLinear;
use super::frozen::assign;
use super::op::{host_tensor, lf, to_candle};
use crate::adapter::{Adapter, Linear, LoraConfig, MethodKind};
use crate::io::peft::{
    AdapterConfig, AdapterTensor, KEY_PREFIX, MethodOptions, VERA_A_KEY, VERA_B_KEY,
    adapter_config_for_method, adapter_layers_from_adapter, drop_masked_ranks, load_adapter,
    save_adapter,
};
use crate::{Cpu, Tensor};

/// The method of an adapted layer (`None` when frozen).
fn kind(l: &AdaptedLinear) -> Option<MethodKind> {
    Some(match l {
        AdaptedLinear::Frozen(_) => return None,
        AdaptedLinear::Lora(_) => MethodKind::Lora,
        AdaptedLinear::Dora(_) => MethodKind::Dora,
        AdaptedLinear::Vera(_) => MethodKind::Vera,
        AdaptedLinear::AdaLora(_) => MethodKind::AdaLora,
    })
}

/// `(r, lora_alpha, use_rslora)` of a layer, as its config is saved.
fn hyper(l: &AdaptedLinear) -> candle_core::Result<(usize, f32, bool)> {
    Ok(match l {
        AdaptedLinear::Frozen(_) => (0, 0.0, false),
        AdaptedLinear::Lora(l) => (l.config().r, l.config().lora_alpha, l.config().use_rslora),
        AdaptedLinear::Dora(l) => {
            let c = l.lora().config();
            (c.r, c.lora_alpha, c.use_rslora)
        }
        AdaptedLinear::Vera(l) => (l.projections().r(), 0.0, false),
        AdaptedLinear::AdaLora(l) => (l.r(), l.lora_alpha(), false),
    })
}

/// Saves the adapted modules among `layers` (`(module path, layer)`, e.g.
/// `("model.layers.0.self_attn.q_proj", &layer)`; frozen ones are skipped) as a PEFT adapter
/// folder: `adapter_config.json` with the keys PEFT 0.21 writes for the method
/// ([`adapter_config_for_method`]; `target_modules` = the last names of the paths) and
/// `adapter_model.safetensors` with PEFT's keys (`base_model.model.<path>.lora_A.weight`, ...;
/// VeRA's shared `base_model.vera_A` / `vera_B` once). For AdaLoRA, `options.adalora` gives
/// `total_step` (PEFT needs it) and the `rank_pattern`, whose masked ranks are dropped from
/// the saved tensors as PEFT does. Atomic ([`save_adapter`]).
///
/// Errors: no adapted layer; layers of different methods, or with different r, lora_alpha or
/// rsLoRA (PEFT's rank and alpha patterns are not written), or VeRA layers over different
/// projections; a repeated path; a rank pattern naming a path not among the AdaLoRA layers;
/// then those of [`adapter_config_for_method`] and [`save_adapter`].
pub fn save_peft(
    dir: &Path,
    layers: &[(&str, &AdaptedLinear)],
    options: &MethodOptions,
) -> candle_core::Result<()> {
    let adapted: Vec<(&str, &AdaptedLinear)> = layers
        .iter()
        .copied()
        .filter(|(_, l)| kind(l).is_some())
        .collect();
    let Some(&(first_path, first)) = adapted.first() else {
        candle_core::bail!("lorafuse save_peft: no adapted layer to save");
    };
    let method = kind(first).unwrap_or(MethodKind::Lora);
    let (r, lora_alpha, use_rslora) = hyper(first)?;
    let mut seen = std::collections::HashSet::new();
    for &(path, l) in &adapted {
        if !seen.insert(path) {
            candle_core::bail!("lorafuse save_peft: module path `{path}` given twice");
        }
        if kind(l) != Some(method) {
            candle_core::bail!(
                "lorafuse save_peft: `{path}` is {:?} but `{first_path}` is {method:?}; one \
                 adapter folder holds one method",
                kind(l)
            );
        }
        if hyper(l)? != (r, lora_alpha, use_rslora) {
            candle_core::bail!(
                "lorafuse save_peft: `{path}` has (r, lora_alpha, use_rslora) {:?} but \
                 `{first_path}` has {:?}; lorafuse writes no rank or alpha pattern",
                hyper(l)?,
                (r, lora_alpha, use_rslora)
            );
        }
        if let (AdaptedLinear::Vera(a), AdaptedLinear::Vera(b)) = (l, first)
            && !a.projections().same(b.projections())
        {
            candle_core::bail!(
                "lorafuse save_peft: `{path}` and `{first_path}` use different VeRA projections"
            );
        }
    }
    let mut targets: Vec<String> = adapted
        .iter()
        .map(|(p, _)| p.rsplit('.').next().unwrap_or(p).to_string())
        .collect();
    targets.sort();
    targets.dedup();
    let lora = LoraConfig {
        r,
        lora_alpha: if method == MethodKind::Vera {
            1.0
        } else {
            lora_alpha
        },
        use_rslora,
        target_modules: targets,
    };
    let cfg = adapter_config_for_method(method, &lora, options).map_err(lf)?;

    let mut tensors: Vec<AdapterTensor> = Vec::new();
    if let AdaptedLinear::Vera(v) = first {
        let sh = v.projections().shared()?;
        for (key, t) in [(VERA_A_KEY, &sh.vera_a), (VERA_B_KEY, &sh.vera_b)] {
            tensors.push((key.to_string(), t.shape().to_vec(), t.data().to_vec()));
        }
    }
    for &(path, l) in &adapted {
        for (suffix, t) in l.params() {
            let t = host_tensor(t, suffix)?;
            let shape = t.shape().to_vec();
            tensors.push((format!("{KEY_PREFIX}{path}.{suffix}"), shape, t.into_vec()));
        }
    }
    if method == MethodKind::AdaLora
        && let Some(pattern) = &options.adalora.rank_pattern
    {
        let pos: HashMap<String, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, (k, _, _))| (k.clone(), i))
            .collect();
        for (path, keep) in pattern {
            if !seen.contains(path.as_str()) {
                candle_core::bail!(
                    "lorafuse save_peft: rank_pattern names `{path}`, which is not among the \
                     AdaLoRA layers"
                );
            }
            if keep.len() != r {
                candle_core::bail!(
                    "lorafuse save_peft: rank_pattern.{path} has {} entries, init_r is {r}",
                    keep.len()
                );
            }
            drop_masked_ranks(&mut tensors, &pos, path, keep);
        }
    }
    save_adapter(dir, &cfg, &tensors).map_err(lf)
}

/// Loads a PEFT adapter folder into the adapted modules among `layers` (`(module path,
/// layer)`), writing the file's values into their tensors in place (the `Var`s an optimizer
/// holds see them), and returns its config. LoRA/rsLoRA, DoRA, VeRA (the projections of the
/// file replace those the layers share) and AdaLoRA (a rank the file's `rank_pattern` masks
/// gets `A = B = E = 0`) load, with PEFT's files' checks ([`adapter_layers_from_adapter`]).
///
/// Errors: those of [`load_adapter`] and [`adapter_layers_from_adapter`] (a file module not
/// among the adapted layers, shapes, ...); a method other than the layer's; an r, lora_alpha
/// or rsLoRA scaling other than the layer's (its scale would differ from PEFT's); an adapted
/// layer the file has nothing for.
pub fn load_peft(
    dir: &Path,
    layers: &[(&str, &AdaptedLinear)],
) -> candle_core::Result<AdapterConfig> {
    let (cfg, tensors) = load_adapter(dir).map_err(lf)?;
    let adapted: BTreeMap<&str, &AdaptedLinear> = layers
        .iter()
        .copied()
        .filter(|(_, l)| kind(l).is_some())
        .collect();
    let modules: Vec<(String, &Linear<Cpu>)> = adapted
        .iter()
        .map(|(p, l)| (p.to_string(), l.base().linear()))
        .collect();
    let loaded = adapter_layers_from_adapter(&Cpu, &cfg, &tensors, &modules).map_err(lf)?;
    let pattern = if loaded.method == MethodKind::AdaLora {
        cfg.adalora_rank_pattern().map_err(lf)?
    } else {
        BTreeMap::new()
    };
    let mut done = std::collections::HashSet::new();
    let mut vera_set = false;
    for (path, a) in &loaded.layers {
        let Some(&layer) = adapted.get(path.as_str()) else {
            candle_core::bail!("lorafuse load_peft: `{path}` is not an adapted layer");
        };
        let set =
            |dst: &candle_core::Tensor, src: &Tensor<Cpu>| assign(dst, &to_candle(src.clone())?);
        let scale_err = |file: f32, ours: f32| {
            candle_core::Error::msg(format!(
                "lorafuse load_peft: `{path}` has scaling {file} in the adapter but {ours} in \
                 the layer (r, lora_alpha or use_rslora differ)"
            ))
        };
        match (a, layer) {
            (Adapter::Lora(f), AdaptedLinear::Lora(l)) => {
                if !close(f.scaling, l.scaling()) {
                    return Err(scale_err(f.scaling, l.scaling()));
                }
                set(&l.lora_a, &f.lora_a)?;
                set(&l.lora_b, &f.lora_b)?;
            }
            (Adapter::Dora(f), AdaptedLinear::Dora(l)) => {
                let s = l.lora().scaling();
                if !close(f.scaling, s) {
                    return Err(scale_err(f.scaling, s));
                }
                set(&l.lora().lora_a, &f.lora_a)?;
                set(&l.lora().lora_b, &f.lora_b)?;
                set(&l.lora_magnitude_vector, &f.lora_magnitude_vector)?;
            }
            (Adapter::Vera(f), AdaptedLinear::Vera(l)) => {
                if !vera_set && let Some(sh) = &loaded.vera_shared {
                    l.projections().replace(sh.clone())?;
                    vera_set = true;
                }
                set(&l.vera_lambda_d, &f.vera_lambda_d)?;
                set(&l.vera_lambda_b, &f.vera_lambda_b)?;
            }
            (Adapter::AdaLora(f), AdaptedLinear::AdaLora(l)) => {
                let (ours, theirs) = (l.factor()?, f.factor());
                if !close(ours, theirs) {
                    return Err(scale_err(theirs, ours));
                }
                let r = l.r();
                let keep = pattern.get(path).cloned().unwrap_or_else(|| vec![true; r]);
                if keep.len() != r {
                    candle_core::bail!(
                        "lorafuse load_peft: rank_pattern.{path} has {} entries, the layer has \
                         init_r {r}",
                        keep.len()
                    );
                }
                set(&l.lora_a, &scatter_rows(&f.lora_a, &keep).map_err(lf)?)?;
                set(&l.lora_e, &scatter_rows(&f.lora_e, &keep).map_err(lf)?)?;
                set(&l.lora_b, &scatter_cols(&f.lora_b, &keep).map_err(lf)?)?;
            }
            (a, l) => candle_core::bail!(
                "lorafuse load_peft: `{path}` is {:?} in the adapter but the layer is {:?}",
                a.kind(),
                kind(l)
            ),
        }
        done.insert(path.as_str());
    }
    for (&path, &layer) in &adapted {
        if done.contains(path) {
            continue;
        }
        match layer {
            // Every rank masked: PEFT keeps no tensor for the module.
            AdaptedLinear::AdaLora(l)
                if pattern.get(path).is_some_and(|k| k.iter().all(|&k| !k)) =>
            {
                for t in [&l.lora_a, &l.lora_b, &l.lora_e] {
                    assign(t, &t.zeros_like()?)?;
                }
            }
            _ => candle_core::bail!(
                "lorafuse load_peft: the adapter in {} has nothing for `{path}`",
                dir.display()
            ),
        }
    }
    Ok(cfg)
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// `[kept, c]` rows placed at the kept ranks of `[r, c]`, zeros elsewhere.
fn scatter_rows(t: &Tensor<Cpu>, keep: &[bool]) -> crate::Result<Tensor<Cpu>> {
    let c = t.dim(1);
    let mut out = vec![0.0; keep.len() * c];
    let kept = keep.iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i);
    for (j, i) in kept.enumerate() {
        out[i * c..(i + 1) * c].copy_from_slice(&t.data()[j * c..(j + 1) * c]);
    }
    Cpu.from_vec(out, &[keep.len(), c])
}

/// `[o, kept]` columns placed at the kept ranks of `[o, r]`, zeros elsewhere.
fn scatter_cols(t: &Tensor<Cpu>, keep: &[bool]) -> crate::Result<Tensor<Cpu>> {
    let (o, k) = (t.dim(0), t.dim(1));
    let r = keep.len();
    let mut out = vec![0.0; o * r];
    let kept: Vec<usize> = (0..r).filter(|&i| keep[i]).collect();
    for row in 0..o {
        for (j, &i) in kept.iter().enumerate() {
            out[row * r + i] = t.data()[row * k + j];
        }
    }
    Cpu.from_vec(out, &[o, r])
}
