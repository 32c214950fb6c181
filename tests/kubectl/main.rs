//! `kubectl hsm`: API calls, arguments, prompts, rendering.
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod api;
mod args;
mod prompt;
mod render;
