//! The request flow: [`service`] runs one request top to bottom; the modules beside it look
//! up and judge stored responses, answer from them, record and write new ones, and coalesce
//! concurrent misses.

pub(crate) mod answer;
pub(crate) mod body;
pub(crate) mod config;
mod join;
mod lookup;
pub(crate) mod service;
pub(crate) mod write;
