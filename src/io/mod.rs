//! File formats: GGUF model files, PEFT adapter folders, safetensors helpers.

pub mod atomic;
pub mod bnb;
pub mod export;
pub mod fetch;
pub mod gguf;
pub mod peft;
