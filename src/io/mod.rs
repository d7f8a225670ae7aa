//! File formats: GGUF model files, transformers model folders, PEFT adapter folders,
//! safetensors helpers.

pub mod atomic;
pub mod bnb;
pub mod export;
pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod peft;
