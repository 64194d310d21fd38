//! CPU binding of ranks: `swarmrun launch --bind-to core|numa|none`, as
//! mpirun's `--bind-to` and srun's `--cpu-bind` do it.
//!
//! - `core`: a rank with local index `i` is bound to core `i mod cores`, in
//!   hwloc's logical core order, to the whole core's cpuset (all its PUs).
//! - `numa`: to the cpuset of NUMA node `i mod nodes`, round-robin.
//! - `none` (the default): the rank keeps the affinity it inherited.
//!
//! Why `none` by default: it keeps what swarmrun always did, and the ranks
//! of a training job already share the host's cores on purpose (one candle
//! thread each, `CANDLE_NUM_THREADS=1`, more ranks than cores in the
//! quickstart): pinning them only decides who waits for whom, and two ranks
//! pinned to one core cannot borrow an idle neighbour. Binding pays when
//! ranks have cores of their own (one rank per core or per NUMA node).
//!
//! Where it happens: the rank binds itself at start, right after learning
//! its local rank and before its transport starts threads, from
//! [`ENV_BIND`], which `swarmrun launch --bind-to` sets. So the same works
//! under mpirun and srun (`mpirun --bind-to none -x SWARMRUN_BIND=core`),
//! and the launcher keeps no per-child state or unsafe pre-exec hook.
//! hwloc sees only the CPUs this process may use (a cgroup, srun's
//! allocation), so binding stays inside them.
//!
//! Why a feature: hwloc is a system library (libhwloc-dev, and libudev-dev
//! for the `hwlocality` crate), and default features need none. Without
//! the feature, asking for `core` or `numa` is an error ([`BindError::NotBuilt`],
//! exit status 2): a binding silently not done would be measured as if it
//! were.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// How the launcher tells each rank to bind: `none`, `core` or `numa`.
pub const ENV_BIND: &str = "SWARMRUN_BIND";
/// Set (to anything but empty or `0`) to have each rank print its binding,
/// like mpirun's `--report-bindings`.
pub const ENV_REPORT_BINDINGS: &str = "SWARMRUN_REPORT_BINDINGS";

/// What a rank is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BindTo {
    #[default]
    None,
    Core,
    Numa,
}

impl FromStr for BindTo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(BindTo::None),
            "core" => Ok(BindTo::Core),
            "numa" => Ok(BindTo::Numa),
            other => Err(format!("{other:?} is not none, core or numa")),
        }
    }
}

impl fmt::Display for BindTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BindTo::None => "none",
            BindTo::Core => "core",
            BindTo::Numa => "numa",
        })
    }
}

#[derive(Debug, Error)]
pub enum BindError {
    #[error(
        "binding to {0} needs swarmrun built with `--features hwloc` \
         (cargo build --release --features hwloc); use --bind-to none to run unbound"
    )]
    NotBuilt(BindTo),
    #[error("{ENV_BIND}={value:?}: {reason}")]
    BadEnv { value: String, reason: String },
    #[error("hwloc: {0}")]
    Hwloc(String),
    #[error("hwloc finds no {0} in this process's topology")]
    NoObjects(&'static str),
}

/// Where a rank was bound: the object's kind, its logical index among
/// `count` such objects, and its cpuset as a list (`0-1,4`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub to: BindTo,
    pub index: usize,
    pub count: usize,
    pub cpus: String,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} of {} (cpus {})",
            self.to, self.index, self.count, self.cpus
        )
    }
}

/// Fails unless this build can bind to `to`; the launcher calls it before
/// starting any rank, so a bad request never reaches the ranks.
pub fn check(to: BindTo) -> Result<(), BindError> {
    match to {
        BindTo::None => Ok(()),
        #[cfg(feature = "hwloc")]
        _ => hw::load().map(drop),
        #[cfg(not(feature = "hwloc"))]
        other => Err(BindError::NotBuilt(other)),
    }
}

/// The binding asked for in [`ENV_BIND`]; unset or empty is `none`.
pub fn from_env() -> Result<BindTo, BindError> {
    match std::env::var(ENV_BIND) {
        Ok(v) if v.is_empty() => Ok(BindTo::None),
        Ok(v) => v
            .parse()
            .map_err(|reason| BindError::BadEnv { value: v, reason }),
        Err(_) => Ok(BindTo::None),
    }
}

/// Binds this whole process (all its threads) for local rank `local_rank`;
/// `None` when asked for no binding.
pub fn apply(to: BindTo, local_rank: usize) -> Result<Option<Binding>, BindError> {
    match to {
        BindTo::None => Ok(None),
        #[cfg(feature = "hwloc")]
        _ => hw::bind(to, local_rank).map(Some),
        #[cfg(not(feature = "hwloc"))]
        other => {
            let _ = local_rank;
            Err(BindError::NotBuilt(other))
        }
    }
}

/// Whether [`ENV_REPORT_BINDINGS`] asks ranks to print their binding.
pub fn report_requested() -> bool {
    std::env::var(ENV_REPORT_BINDINGS).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The CPUs the kernel lets this process run on, as `/proc/self/status`
/// lists them (`Cpus_allowed_list`), the truth whatever bound us; `None`
/// where there is no procfs.
pub fn allowed_cpus() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// The report line of `--report-bindings`.
pub fn report_line(binding: Option<&Binding>) -> String {
    let allowed = allowed_cpus().unwrap_or_else(|| "unknown".into());
    match binding {
        Some(b) => format!("bound to {b}; Cpus_allowed_list {allowed}"),
        None => format!("not bound; Cpus_allowed_list {allowed}"),
    }
}

#[cfg(feature = "hwloc")]
mod hw {
    use hwlocality::bitmap::Bitmap;
    use hwlocality::cpu::binding::CpuBindingFlags;
    use hwlocality::object::types::ObjectType;
    use hwlocality::Topology;

    use super::{BindError, BindTo, Binding};

    pub fn load() -> Result<Topology, BindError> {
        Topology::new().map_err(|e| BindError::Hwloc(format!("cannot load the topology: {e}")))
    }

    pub fn bind(to: BindTo, local_rank: usize) -> Result<Binding, BindError> {
        let topology = load()?;
        let (kind, name) = match to {
            BindTo::Core => (ObjectType::Core, "cores"),
            BindTo::Numa => (ObjectType::NUMANode, "NUMA nodes"),
            BindTo::None => unreachable!("no binding is handled by the caller"),
        };
        // Logical order: hwloc's, the one lstopo and mpirun number by.
        let mut objects: Vec<_> = topology
            .objects_with_type(kind)
            .filter(|o| o.cpuset().is_some_and(|c| !c.is_empty()))
            .collect();
        objects.sort_by_key(|o| o.logical_index());
        if objects.is_empty() {
            return Err(BindError::NoObjects(name));
        }
        let index = local_rank % objects.len();
        let object = objects[index];
        let cpuset = object
            .cpuset()
            .ok_or(BindError::NoObjects(name))?
            .clone_target();
        topology
            .bind_cpu(&cpuset, CpuBindingFlags::PROCESS)
            .map_err(|e| {
                BindError::Hwloc(format!("cannot bind to {to} {index} ({cpuset}): {e}"))
            })?;
        Ok(Binding {
            to,
            index: object.logical_index(),
            count: objects.len(),
            // The plain list (`0-1,4`), as /proc and taskset write it.
            cpus: AsRef::<Bitmap>::as_ref(&cpuset).to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_to_parses_the_three_words_and_nothing_else() {
        for to in [BindTo::None, BindTo::Core, BindTo::Numa] {
            assert_eq!(to.to_string().parse::<BindTo>(), Ok(to));
        }
        assert!("socket".parse::<BindTo>().is_err());
    }

    #[test]
    fn no_binding_is_always_possible() {
        assert!(check(BindTo::None).is_ok());
        assert_eq!(apply(BindTo::None, 3).unwrap(), None);
    }

    #[cfg(not(feature = "hwloc"))]
    #[test]
    fn without_the_feature_core_and_numa_are_refused_naming_the_feature() {
        for to in [BindTo::Core, BindTo::Numa] {
            let e = check(to).unwrap_err();
            assert!(matches!(e, BindError::NotBuilt(t) if t == to));
            assert!(e.to_string().contains("--features hwloc"), "{e}");
            assert!(apply(to, 0).is_err());
        }
    }

    #[test]
    fn this_process_has_an_allowed_cpu_list() {
        let cpus = allowed_cpus().expect("procfs");
        assert!(cpus.starts_with(|c: char| c.is_ascii_digit()), "{cpus}");
    }
}
