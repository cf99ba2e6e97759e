//! The response cache middleware, in the shape of tower-http's: [`layer`] (the builder users
//! see), [`service`] (the tower `Service` and the request flow, top to bottom), [`future`] and
//! [`body`] (what a call returns); beside them the steps of the flow (coalescing, lookups,
//! writes, answers) and the state every request of a layer shares.

pub(crate) mod answer;
pub(crate) mod body;
pub(crate) mod future;
pub(crate) mod invalidate;
mod join;
pub(crate) mod layer;
mod lookup;
pub(crate) mod service;
pub(crate) mod state;
pub(crate) mod write;
