//! Fine-tuning: datasets, optimizer, learning-rate schedule and the training loop.

pub mod align;
pub mod chat_data;
pub mod compare;
pub mod data;
pub mod dpo;
pub mod hooks;
pub mod job;
pub mod multi;
pub mod optim;
pub mod preference;
pub mod recipe;
pub mod report;
pub mod reward;
pub mod schedule;
pub mod trainer;
