//! gateway: an eBPF-accelerated gateway appliance.
//!
//! The sans-IO parts (config validation, the route table, status rendering) are plain
//! functions with unit tests; the IO adapters (the eBPF dataplane, the status socket, the
//! state directory) stay thin around them.

pub mod api;
pub mod assets;
pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;
pub mod dataplane;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod pingrange;
pub mod pki;
pub mod plan;
pub mod preflight;
pub mod routes;
pub mod server;
pub mod state;
pub mod sys;
pub mod tunnel;
pub mod unit;
