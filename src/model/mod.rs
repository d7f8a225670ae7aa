//! The Llama-architecture model and its tokenizer.

pub mod config;
pub mod llama;
pub mod load;
pub mod tokenizer;

pub use config::LlamaConfig;
