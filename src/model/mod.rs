//! The Llama-architecture model and its tokenizer.

pub mod additive;
pub mod batch;
pub mod chat;
pub mod config;
pub mod generate;
pub mod heads;
pub mod inject;
pub mod llama;
pub mod multi;
pub mod tokenizer;

pub use config::LlamaConfig;
