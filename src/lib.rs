#![doc = include_str!("../docs/crate.md")]
#![warn(missing_docs)]
#![deny(unsafe_code)]
#![deny(unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod entry;
mod error;
mod key;
mod layer;
mod policy;
mod service;
pub mod store;

pub use body::CacheBody;
pub use error::{Error, ErrorKind, Result};
pub use layer::CacheLayer;
pub use service::{CacheService, ResponseFuture, X_CACHE};
#[cfg(feature = "memory")]
pub use store::MemoryStore;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::Store;
