//! A transformers model folder (`save_pretrained`'s layout): `config.json`, the weights in
//! `model.safetensors` or sharded under `model.safetensors.index.json`, and `tokenizer.json`
//! and `tokenizer_config.json` when present. Only Llama-architecture models
//! (`LlamaForCausalLM`; SmolLM2 is one) are read; their q/k rows are in transformers' order
//! already.

use crate::error::{Error, Result};
use crate::io::peft::{parse_safetensors, to_f32};
use crate::model::LlamaConfig;
use memmap2::Mmap;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// The config file of a transformers model folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights of an unsharded folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded folder (`weight_map`: tensor name -> shard file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer of the `tokenizers` library.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer's settings (special tokens, `chat_template`).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// An opened transformers model folder: its config and where each tensor lives. Shards are
/// memory-mapped when first read and stay mapped while the folder is open.
pub struct HfFolder {
    dir: PathBuf,
    config: LlamaConfig,
    raw_config: Value,
    /// Tensor name -> shard file name.
    weight_map: BTreeMap<String, String>,
    shards: HashMap<String, Mmap>,
}

impl std::fmt::Debug for HfFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfFolder")
            .field("dir", &self.dir)
            .field("tensors", &self.weight_map.len())
            .finish()
    }
}

/// True when `path` is a folder holding a transformers `config.json` (what `--model DIR`
/// accepts next to a GGUF file).
pub fn is_hf_folder(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).is_file()
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        context: path.display().to_string(),
        msg: e.to_string(),
    })
}

impl HfFolder {
    /// Opens `dir`: parses `config.json` into a [`LlamaConfig`] ([`llama_config_from_json`])
    /// and lists the tensors of `model.safetensors`, or of every shard named by
    /// `model.safetensors.index.json`. Errors: a missing config or weights file (naming it),
    /// a config that is not a supported Llama, malformed JSON or safetensors headers.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                name: CONFIG_FILE.into(),
            });
        }
        let raw_config = read_json(&cfg_path)?;
        let config = llama_config_from_json(&cfg_path, &raw_config)?;
        let mut folder = HfFolder {
            dir: dir.to_path_buf(),
            config,
            raw_config,
            weight_map: BTreeMap::new(),
            shards: HashMap::new(),
        };
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::Missing {
                    path: index.clone(),
                    name: "weight_map".into(),
                })?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::format(&index, format!("weight_map[`{name}`] is not a file name"))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::format(
                        &index,
                        format!("weight_map[`{name}`] = `{file}` is not a file of this folder"),
                    ));
                }
                folder.weight_map.insert(name.clone(), file.to_string());
            }
        } else if dir.join(WEIGHTS_FILE).is_file() {
            folder.map_shard(WEIGHTS_FILE)?;
            let names: Vec<String> = {
                let st = parse_safetensors(&dir.join(WEIGHTS_FILE), &folder.shards[WEIGHTS_FILE])?;
                st.names().into_iter().map(str::to_string).collect()
            };
            for n in names {
                folder.weight_map.insert(n, WEIGHTS_FILE.to_string());
            }
        } else {
            if dir.join("pytorch_model.bin").is_file() {
                return Err(Error::format(
                    dir,
                    "holds pytorch_model.bin (a pickle); lorafuse reads only safetensors \
                     (re-save with safe_serialization=True)",
                ));
            }
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                name: format!("{WEIGHTS_FILE} or {INDEX_FILE}"),
            });
        }
        Ok(folder)
    }

    fn map_shard(&mut self, file: &str) -> Result<()> {
        if self.shards.contains_key(file) {
            return Ok(());
        }
        let path = self.dir.join(file);
        let f = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only and kept with the folder; a file changed underneath
        // while mapped is outside what lorafuse supports (as for the GGUF reader).
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
        self.shards.insert(file.to_string(), map);
        Ok(())
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model's shape hyperparameters.
    pub fn llama_config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The parsed `config.json`.
    pub fn raw_config(&self) -> &Value {
        &self.raw_config
    }

    /// Names of every tensor in the folder, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(String::as_str)
    }

    /// Whether the folder has tensor `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }

    /// Tensor `name` as f32 with its shape (f32, f16, bf16 and f64 are converted). Errors: a
    /// tensor the folder does not have ([`Error::Missing`] naming the file and key), a shard
    /// that cannot be read, another dtype.
    pub fn tensor_f32(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let file = self
            .weight_map
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Missing {
                path: self.dir.join(WEIGHTS_FILE),
                name: name.to_string(),
            })?;
        self.map_shard(&file)?;
        let path = self.dir.join(&file);
        let st = parse_safetensors(&path, &self.shards[&file])?;
        let view = st.tensor(name).map_err(|_| Error::Missing {
            path: path.clone(),
            name: name.to_string(),
        })?;
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            Error::format(
                &path,
                format!(
                    "tensor `{name}` has dtype {:?}; expected F32, F16, BF16 or F64",
                    view.dtype()
                ),
            )
        })?;
        Ok((data, view.shape().to_vec()))
    }

    /// `tokenizer.json`, when the folder has one.
    pub fn tokenizer_file(&self) -> Option<PathBuf> {
        let p = self.dir.join(TOKENIZER_FILE);
        p.is_file().then_some(p)
    }

    /// `tokenizer_config.json`'s `chat_template` (a string, or the template named `default` of
    /// a list), when present. Errors: a malformed file.
    pub fn chat_template(&self) -> Result<Option<String>> {
        let p = self.dir.join(TOKENIZER_CONFIG_FILE);
        if !p.is_file() {
            return Ok(None);
        }
        let v = read_json(&p)?;
        Ok(match v.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        })
    }
}

/// The [`LlamaConfig`] of a transformers `config.json` (`LlamaConfig`'s fields and defaults:
/// `num_key_value_heads` defaults to the head count, `head_dim` to hidden / heads, `rope_theta`
/// (top level, or `rope_parameters.rope_theta` as transformers 5 writes it) to 10000,
/// `tie_word_embeddings` to false, `rms_norm_eps` to 1e-6). Errors naming the file and key:
/// not a Llama (`model_type`), a missing or mistyped size, heads that do not divide, an odd
/// head_dim, biases in attention or MLP, RoPE scaling other than the default.
pub fn llama_config_from_json(path: &Path, v: &Value) -> Result<LlamaConfig> {
    let bad = |msg: String| Error::format(path, msg);
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let is_llama_arch = v
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLM")));
    if model_type != "llama" && !is_llama_arch {
        return Err(bad(format!(
            "model_type is `{model_type}`; only Llama-architecture models (`llama`) are supported"
        )));
    }
    let usize_key = |k: &str| -> Result<usize> {
        v.get(k)
            .ok_or_else(|| Error::Missing {
                path: path.to_path_buf(),
                name: k.to_string(),
            })?
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| bad(format!("`{k}` is not a non-negative integer")))
    };
    let opt_usize = |k: &str| -> Result<Option<usize>> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| bad(format!("`{k}` is not a non-negative integer"))),
        }
    };
    let f32_key = |k: &str, obj: &Value| -> Result<Option<f32>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| bad(format!("`{k}` is not a number"))),
        }
    };
    // eos_token_id may be a list (the first one ends generation as transformers' does).
    let token_id = |k: &str| -> Result<Option<u32>> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => Ok(a.first().and_then(Value::as_u64).map(|x| x as u32)),
            Some(x) => x
                .as_u64()
                .map(|x| Some(x as u32))
                .ok_or_else(|| bad(format!("`{k}` is not a token id"))),
        }
    };
    let hidden = usize_key("hidden_size")?;
    let heads = usize_key("num_attention_heads")?;
    let kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(bad(format!(
            "num_attention_heads {heads} is not a positive multiple of num_key_value_heads \
             {kv_heads}"
        )));
    }
    if hidden == 0 || hidden % heads != 0 {
        return Err(bad(format!(
            "hidden_size {hidden} is not a positive multiple of num_attention_heads {heads}"
        )));
    }
    let head_dim = opt_usize("head_dim")?.unwrap_or(hidden / heads);
    if head_dim != hidden / heads {
        return Err(bad(format!(
            "head_dim {head_dim} differs from hidden_size / num_attention_heads = {} (not \
             supported)",
            hidden / heads
        )));
    }
    if head_dim % 2 != 0 {
        return Err(bad(format!(
            "head_dim {head_dim} is odd; RoPE needs it even"
        )));
    }
    for k in ["attention_bias", "mlp_bias"] {
        if v.get(k).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!(
                "`{k}: true` is not supported (Llama without biases)"
            )));
        }
    }
    let rope_params = v.get("rope_parameters").or_else(|| v.get("rope_scaling"));
    if let Some(rp) = rope_params.filter(|x| !x.is_null()) {
        let ty = rp
            .get("rope_type")
            .or_else(|| rp.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if ty != "default" {
            return Err(bad(format!("RoPE scaling `{ty}` is not supported")));
        }
    }
    let rope_theta = match f32_key("rope_theta", v)? {
        Some(t) => t,
        None => match rope_params {
            Some(rp) => f32_key("rope_theta", rp)?.unwrap_or(10000.0),
            None => 10000.0,
        },
    };
    let eos = token_id("eos_token_id")?.unwrap_or(2);
    Ok(LlamaConfig {
        vocab_size: usize_key("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: usize_key("intermediate_size")?,
        num_hidden_layers: usize_key("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rope_theta,
        rms_norm_eps: f32_key("rms_norm_eps", v)?.unwrap_or(1e-6),
        tie_word_embeddings: v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(2048),
        bos_token_id: token_id("bos_token_id")?.unwrap_or(1),
        eos_token_id: eos,
        pad_token_id: token_id("pad_token_id")?.unwrap_or(eos),
    })
}
