//! `kubectl hsm`: API calls, arguments, prompts, rendering.
#![allow(clippy::unwrap_used)]

#[path = "../kit/mod.rs"]
mod kit;

mod api;
mod args;
mod prompt;
mod render;
