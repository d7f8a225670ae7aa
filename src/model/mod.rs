//! The Llama-architecture model and its tokenizer.

pub mod config;
pub mod llama;
pub mod tokenizer;

pub use config::LlamaConfig;
