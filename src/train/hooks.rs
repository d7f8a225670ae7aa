//! The work a method adds around each optimizer step ([`StepHook`]s): AdaLoRA's orthogonal
//! regularizer and rank allocator, AdapterFusion's value regularizer.

use crate::adapter::device_rank_allocator::{AdaLoraDeviceLayer, DeviceRankAllocator};
use crate::adapter::rank_allocator::AdaLoraSchedule;
use crate::adapter::{AdaLoraLayer, Adapter, MethodKind};
use crate::backend::{Axis, Backend, Tensor};
use crate::error::{Error, Result};
use crate::model::llama::{Llama, proj_path};
use crate::train::recipe::{AdaLoraSettings, Method, Recipe};
use crate::train::trainer::{NoHook, StepHook};
use std::collections::BTreeMap;

/// AdapterFusion's value regularizer, as the `adapters` library adds it to the loss:
/// `reg_weight * SUM over layers of ||I - W_value||_F^2` (weight 0.01), its gradient
/// `2 reg_weight (W_value - I)` joining each layer's `value.weight` gradient. Everything stays
/// on the device (the identity is made once); the value is read back with the loss.
pub struct FusionHook<B: Backend> {
    eye: Option<Tensor<B>>,
}

impl<B: Backend> Default for FusionHook<B> {
    fn default() -> Self {
        FusionHook { eye: None }
    }
}

impl<B: Backend> StepHook<B> for FusionHook<B> {
    fn before_update(
        &mut self,
        be: &B,
        _step: usize,
        model: &Llama<B>,
        names: &[String],
        grads: &mut [Tensor<B>],
    ) -> Result<Option<Tensor<B>>> {
        let fu = model
            .fusion
            .as_ref()
            .ok_or_else(|| Error::arg("fusion", "the model has no AdapterFusion"))?;
        if fu.reg_weight == 0.0 || fu.layers.is_empty() {
            return Ok(None);
        }
        let d = fu.layers[0].value_w.dim(0);
        if self.eye.is_none() {
            let mut eye = vec![0.0f32; d * d];
            for i in 0..d {
                eye[i * d + i] = 1.0;
            }
            self.eye = Some(be.upload(&eye, &[d, d])?);
        }
        let eye = self.eye.as_ref().expect("made above");
        let name = fu.name();
        let mut rows = be.zeros(&[d])?;
        for (l, fl) in fu.layers.iter().enumerate() {
            let (r, g) = fl.value_reg(be, eye)?;
            be.axpy(&mut rows, 1.0, &r)?;
            let key = format!(
                "model.layers.{l}.output_adapters.adapter_fusion_layer.{name}.value.weight"
            );
            let i = grad_index(names, &key)?;
            be.axpy(&mut grads[i], fu.reg_weight, &g)?;
        }
        let mut total = be.sum_product(&rows.into_shape(&[1, d])?, None, Axis::Rows)?;
        be.scale(&mut total, fu.reg_weight)?;
        Ok(Some(total))
    }
}

/// AdaLoRA's work around each optimizer step, as PEFT's `AdaLoraModel` does it: the
/// orthogonal regularizer's gradient joins the loss's before the update, and
/// `update_and_allocate(global_step)` runs after it (1-based steps). Both run on the backend
/// ([`Backend::adalora_orth_reg`], [`DeviceRankAllocator`]): the regularizer's value is read
/// back with the loss and nothing else is, mask steps included.
pub struct AdaLoraHook<B: Backend> {
    alloc: DeviceRankAllocator<B>,
    orth_reg_weight: f32,
    /// `(module path, layer index, projection index)` of every AdaLoRA layer, in the order of
    /// the model's layers and projections.
    layers: Vec<(String, usize, usize)>,
}

impl<B: Backend> AdaLoraHook<B> {
    /// Errors: the schedule or budget is invalid for this model (see [`RankAllocator::new`]);
    /// a backend error allocating the allocator's buffers.
    ///
    /// [`RankAllocator::new`]: crate::adapter::rank_allocator::RankAllocator::new
    pub fn new(be: &B, model: &Llama<B>, s: &AdaLoraSettings, total_step: u64) -> Result<Self> {
        let mut layers = Vec::new();
        let mut ranks = Vec::new();
        for (l, b) in model.layers.iter().enumerate() {
            for (p, proj) in b.proj.iter().enumerate() {
                if let Some(Adapter::AdaLora(a)) = &proj.adapter {
                    layers.push((proj_path(l, p), l, p));
                    ranks.push(a.r());
                }
            }
        }
        let named: Vec<(&str, usize)> = layers
            .iter()
            .zip(&ranks)
            .map(|((n, _, _), &r)| (n.as_str(), r))
            .collect();
        let schedule = AdaLoraSchedule {
            init_r: s.init_r,
            target_r: s.target_r,
            tinit: s.tinit,
            tfinal: s.tfinal,
            delta_t: s.delta_t,
            total_step,
        };
        Ok(AdaLoraHook {
            alloc: DeviceRankAllocator::new(be, schedule, s.beta1, s.beta2, &named)?,
            orth_reg_weight: s.orth_reg_weight,
            layers,
        })
    }

    /// The rank allocator (its rank pattern after the first mask:
    /// [`DeviceRankAllocator::rank_pattern`]).
    pub fn allocator(&self) -> &DeviceRankAllocator<B> {
        &self.alloc
    }

    /// Every AdaLoRA layer of `model`, in the hook's order. Errors: the layers changed since
    /// the hook was made.
    fn adapters<'m>(&self, model: &'m Llama<B>) -> Result<Vec<&'m AdaLoraLayer<B>>> {
        let found: Vec<&AdaLoraLayer<B>> = self
            .layers
            .iter()
            .filter_map(
                |(_, l, p)| match &model.layers.get(*l)?.proj.get(*p)?.adapter {
                    Some(Adapter::AdaLora(a)) => Some(a),
                    _ => None,
                },
            )
            .collect();
        if found.len() != self.layers.len() {
            return Err(disappeared());
        }
        Ok(found)
    }
}

fn disappeared() -> Error {
    Error::arg("adapter", "AdaLoRA layer disappeared during training")
}

fn grad_index(names: &[String], name: &str) -> Result<usize> {
    names
        .iter()
        .position(|n| n == name)
        .ok_or_else(|| Error::arg("grads", format!("no gradient named `{name}`")))
}

impl<B: Backend> StepHook<B> for AdaLoraHook<B> {
    fn before_update(
        &mut self,
        be: &B,
        _step: usize,
        model: &Llama<B>,
        names: &[String],
        grads: &mut [Tensor<B>],
    ) -> Result<Option<Tensor<B>>> {
        if self.orth_reg_weight == 0.0 {
            return Ok(None);
        }
        let factors: Vec<(&Tensor<B>, &Tensor<B>)> = self
            .adapters(model)?
            .into_iter()
            .map(|a| (&a.lora_a, &a.lora_b))
            .collect();
        // Disjoint mutable borrows of each layer's two gradients.
        let mut slots: Vec<Option<&mut Tensor<B>>> = grads.iter_mut().map(Some).collect();
        let mut pairs = Vec::with_capacity(self.layers.len());
        for (path, _, _) in &self.layers {
            let mut take = |suffix: &str| {
                let i = grad_index(names, &format!("{path}.{suffix}"))?;
                slots.get_mut(i).and_then(Option::take).ok_or_else(|| {
                    Error::arg("grads", format!("gradient `{path}.{suffix}` missing"))
                })
            };
            let ga = take("lora_A")?;
            let gb = take("lora_B")?;
            pairs.push((ga, gb));
        }
        be.adalora_orth_reg(&factors, &mut pairs, self.orth_reg_weight)
            .map(Some)
    }

    fn after_update(
        &mut self,
        be: &B,
        step: usize,
        model: &mut Llama<B>,
        names: &[String],
        grads: &[Tensor<B>],
    ) -> Result<()> {
        let mut adapters: Vec<&mut AdaLoraLayer<B>> = model
            .layers
            .iter_mut()
            .flat_map(|b| b.proj.iter_mut())
            .filter_map(|proj| match &mut proj.adapter {
                Some(Adapter::AdaLora(a)) => Some(a),
                _ => None,
            })
            .collect();
        if adapters.len() != self.layers.len() {
            return Err(disappeared());
        }
        let mut views = Vec::with_capacity(self.layers.len());
        for ((path, _, _), a) in self.layers.iter().zip(adapters.iter_mut()) {
            let grad = |suffix: &str| -> Result<&Tensor<B>> {
                Ok(&grads[grad_index(names, &format!("{path}.{suffix}"))?])
            };
            let AdaLoraLayer {
                lora_a,
                lora_b,
                lora_e,
                ..
            } = &mut **a;
            views.push(AdaLoraDeviceLayer {
                name: path,
                lora_a,
                grad_a: grad("lora_A")?,
                lora_b,
                grad_b: grad("lora_B")?,
                lora_e,
                grad_e: grad("lora_E")?,
            });
        }
        self.alloc
            .update_and_allocate(be, step as u64 + 1, &mut views)?;
        Ok(())
    }
}

/// The hook a recipe's method runs around each step, whatever the objective (SFT, DPO, a
/// reward model): AdaLoRA's, AdapterFusion's, or none.
pub enum MethodHook<B: Backend> {
    None(NoHook),
    Fusion(FusionHook<B>),
    AdaLora(Box<AdaLoraHook<B>>),
}

impl<B: Backend> MethodHook<B> {
    /// The hook of `recipe`'s method over `steps` steps, for a model already prepared for it.
    /// Errors: AdaLoRA's (a model without AdaLoRA layers, bad settings).
    pub fn for_recipe(be: &B, model: &Llama<B>, recipe: &Recipe, steps: usize) -> Result<Self> {
        Ok(if recipe.method == Method::AdapterFusion {
            MethodHook::Fusion(FusionHook::default())
        } else if recipe.method.adapter_kind() == Some(MethodKind::AdaLora) {
            let h = AdaLoraHook::new(be, model, &recipe.adalora, steps as u64)?;
            MethodHook::AdaLora(Box::new(h))
        } else {
            MethodHook::None(NoHook)
        })
    }

    /// What the method learned about the adapter's shape: AdaLoRA's kept ranks per module.
    pub fn rank_pattern(&self, be: &B) -> Result<Option<BTreeMap<String, Vec<bool>>>> {
        match self {
            MethodHook::AdaLora(h) => h.allocator().rank_pattern(be),
            _ => Ok(None),
        }
    }

    fn inner(&mut self) -> &mut dyn StepHook<B> {
        match self {
            MethodHook::None(h) => h,
            MethodHook::Fusion(h) => h,
            MethodHook::AdaLora(h) => h.as_mut(),
        }
    }
}

impl<B: Backend> StepHook<B> for MethodHook<B> {
    fn before_update(
        &mut self,
        be: &B,
        step: usize,
        model: &Llama<B>,
        names: &[String],
        grads: &mut [Tensor<B>],
    ) -> Result<Option<Tensor<B>>> {
        self.inner().before_update(be, step, model, names, grads)
    }
    fn after_update(
        &mut self,
        be: &B,
        step: usize,
        model: &mut Llama<B>,
        names: &[String],
        grads: &[Tensor<B>],
    ) -> Result<()> {
        self.inner().after_update(be, step, model, names, grads)
    }
}
