//! swarmrun: an HPC-style launcher with MPI-like collectives for training one
//! language model across many unreliable machines.
//!
//! Layers, lowest first (a module uses only modules before it):
//! `config`, `wire`, `world`, `transport`, `launch`.
pub mod config;
pub mod transport;
