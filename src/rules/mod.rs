//! The HTTP rules: may this request be answered from the cache, may this response be stored,
//! for how long, and what is a stored response good for. Pure functions of headers, parsed
//! directives and the route's settings; nothing here knows about stores.

pub(crate) mod conditional;
pub(crate) mod date;
pub(crate) mod freshness;
pub(crate) mod range;
pub(crate) mod request;
pub(crate) mod tags;
pub(crate) mod vary;

#[cfg(test)]
mod tests;
