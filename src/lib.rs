//! swarmrun: an HPC-style launcher with MPI-like collectives for training one
//! language model across many unreliable machines.
//!
//! Layers, lowest first (a module uses only modules before it):
//! `config`, `fsutil`, `wire`, `world`, `transport`, `collective`, `hello`,
//! `launch`, `bench`. `wire` (framed, authenticated streams) sits below
//! `world` because the TCP rendezvous authenticates with the same handshake
//! as the transport.
pub mod bench;
pub mod collective;
pub mod config;
pub mod fsutil;
pub mod hello;
pub mod launch;
pub mod transport;
pub mod wire;
pub mod world;
