//! swarmrun: an HPC-style launcher with MPI-like collectives for training one
//! language model across many unreliable machines.
//!
//! Layers, lowest first (a module uses only modules before it):
//! `config`, `fsutil`, `wire`, `world`, `transport`, `collective`,
//! `compress`, `data`, `model`, `pipeline`, `checkpoint`, `ledger`,
//! `roles`, `metrics`, `hello`, `launch`, `bench`. `ledger` (the reward
//! ledger and its verifier) sits below `roles` because the orchestrator
//! keeps it. `wire` (framed, authenticated
//! streams) sits below `world` because the TCP rendezvous authenticates
//! with the same handshake as the transport. `data` and `model` need no network: a stage's forward and
//! backward pass are pure functions of its weights and inputs.
pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod compress;
pub mod config;
pub mod data;
pub mod deadline;
pub mod fsutil;
pub mod fuzzing;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod hello;
pub mod isa;
pub mod launch;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod pipeline;
pub mod plot;
pub mod prometheus;
pub mod roles;
pub mod signing;
pub mod status;
pub mod transport;
pub mod wan;
pub mod wire;
pub mod world;
