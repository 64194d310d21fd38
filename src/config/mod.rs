//! Job files (in progress).

pub mod hostlist;

pub struct JobSpec;
