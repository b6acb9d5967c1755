//! Subcommands besides `serve`.

pub mod accuracy;
pub mod carrier;
pub mod decode;
pub mod deliver;
pub mod device;
pub mod index;
pub mod load;
pub mod recording;
pub mod sink;
pub mod stream;
