//! Subcommands besides `serve`.

pub mod decode;
pub mod index;
pub mod stream;
