//! Who am I? Rank, world size and local rank from the environment that
//! started this process, without linking MPI.
//!
//! Launchers announce ranks in their own variables. We read them in a fixed
//! order, most specific first, so that a process started by `mpirun` inside a
//! Slurm allocation trusts `mpirun` (which knows the real world) rather than
//! the allocation's outer step:
//!
//! | launcher            | rank                    | size                    | local rank                    |
//! |---------------------|-------------------------|-------------------------|-------------------------------|
//! | OpenMPI `mpirun`    | OMPI_COMM_WORLD_RANK    | OMPI_COMM_WORLD_SIZE    | OMPI_COMM_WORLD_LOCAL_RANK    |
//! | Slurm `srun`        | SLURM_PROCID            | SLURM_NTASKS            | SLURM_LOCALID                 |
//! | MPICH/Hydra (PMI)   | PMI_RANK                | PMI_SIZE                | MPI_LOCALRANKID               |
//! | PMIx (prterun, ...) | PMIX_RANK               | from the job file       | PMIX_LOCAL_RANK               |
//! | torchrun, swarmrun  | RANK                    | WORLD_SIZE              | LOCAL_RANK                    |
//!
//! PMIx publishes no world size in the environment (it lives behind the PMIx
//! API), so under a bare PMIx launcher the size is the job file's slot count.

use std::fmt;

use thiserror::Error;

/// The launcher family a rank identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherKind {
    OpenMpi,
    Slurm,
    Pmi,
    Pmix,
    /// torchrun, `swarmrun launch`, or a user exporting RANK/WORLD_SIZE.
    Generic,
}

impl fmt::Display for LauncherKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LauncherKind::OpenMpi => "OpenMPI (OMPI_COMM_WORLD_*)",
            LauncherKind::Slurm => "Slurm (SLURM_PROCID/SLURM_NTASKS)",
            LauncherKind::Pmi => "PMI (PMI_RANK/PMI_SIZE)",
            LauncherKind::Pmix => "PMIx (PMIX_RANK)",
            LauncherKind::Generic => "RANK/WORLD_SIZE",
        })
    }
}

/// What the environment says about this process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub launcher: LauncherKind,
    /// Slurm's step nodelist, for the `slurm` rendezvous backend.
    pub slurm_nodelist: Option<String>,
    /// Slurm job id (and step id), for deriving the `slurm` rendezvous port.
    pub slurm_job: Option<(u64, u64)>,
    /// An id shared by all ranks of one launch, used to keep `file://`
    /// rendezvous directories of different runs apart.
    pub run_id: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DetectError {
    #[error(
        "no launcher found: set OMPI_COMM_WORLD_* (mpirun), SLURM_PROCID/SLURM_NTASKS (srun), \
         PMI_RANK/PMI_SIZE, PMIX_RANK, or RANK/WORLD_SIZE; or start the job with `swarmrun launch`"
    )]
    NoLauncher,
    #[error("{var}={value:?} is not a non-negative integer")]
    NotANumber { var: String, value: String },
    #[error("{launcher}: rank {rank} is outside world size {size}")]
    RankOutOfRange {
        launcher: LauncherKind,
        rank: usize,
        size: usize,
    },
    #[error("{launcher}: world size is 0")]
    EmptyWorld { launcher: LauncherKind },
    #[error("PMIX_RANK is set but no world size is known: pass one in the job file's sites")]
    PmixWithoutSize,
}

/// Launcher families in the order they are trusted: (kind, rank, size,
/// local rank). A size of `None` means the family publishes none.
const FAMILIES: &[(LauncherKind, &str, Option<&str>, &str)] = &[
    (
        LauncherKind::OpenMpi,
        "OMPI_COMM_WORLD_RANK",
        Some("OMPI_COMM_WORLD_SIZE"),
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
    (
        LauncherKind::Slurm,
        "SLURM_PROCID",
        Some("SLURM_NTASKS"),
        "SLURM_LOCALID",
    ),
    (
        LauncherKind::Pmi,
        "PMI_RANK",
        Some("PMI_SIZE"),
        "MPI_LOCALRANKID",
    ),
    (LauncherKind::Pmix, "PMIX_RANK", None, "PMIX_LOCAL_RANK"),
    (
        LauncherKind::Generic,
        "RANK",
        Some("WORLD_SIZE"),
        "LOCAL_RANK",
    ),
];

/// Every variable [`detect`] reads a rank identity from. `swarmrun launch`
/// clears them in its children, so a launch inside an `salloc` or `mpirun`
/// shell does not inherit the outer launcher's identity.
pub fn identity_variables() -> impl Iterator<Item = &'static str> {
    FAMILIES
        .iter()
        .flat_map(|&(_, rank, size, local)| [Some(rank), size, Some(local)].into_iter().flatten())
}

/// Reads the launcher's variables through `var` (so tests can pass a map).
///
/// `fallback_size` is the job file's slot count, used only where the
/// launcher does not publish a size (bare PMIx).
pub fn detect(
    var: impl Fn(&str) -> Option<String>,
    fallback_size: Option<usize>,
) -> Result<RankEnv, DetectError> {
    let num = |name: &str| -> Result<Option<usize>, DetectError> {
        match var(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| DetectError::NotANumber {
                    var: name.to_string(),
                    value: v,
                }),
        }
    };

    for &(launcher, rank_var, size_var, local_var) in FAMILIES {
        let Some(rank) = num(rank_var)? else { continue };
        let size = match size_var {
            Some(v) => match num(v)? {
                Some(s) => s,
                None => continue,
            },
            None => fallback_size.ok_or(DetectError::PmixWithoutSize)?,
        };
        if size == 0 {
            return Err(DetectError::EmptyWorld { launcher });
        }
        if rank >= size {
            return Err(DetectError::RankOutOfRange {
                launcher,
                rank,
                size,
            });
        }
        let local_rank = num(local_var)?.unwrap_or(0);
        let slurm_job = match (num("SLURM_JOB_ID")?, num("SLURM_STEP_ID")?) {
            (Some(job), step) => Some((job as u64, step.unwrap_or(0) as u64)),
            (None, _) => None,
        };
        let run_id = var("SWARMRUN_RUN_ID")
            .or_else(|| var("TORCHELASTIC_RUN_ID"))
            .or_else(|| var("PMIX_NAMESPACE"))
            .or_else(|| var("OMPI_MCA_ess_base_jobid"))
            .or_else(|| slurm_job.map(|(j, s)| format!("slurm-{j}.{s}")));
        return Ok(RankEnv {
            rank,
            size,
            local_rank,
            launcher,
            slurm_nodelist: var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_JOB_NODELIST")),
            slurm_job,
            run_id,
        });
    }
    Err(DetectError::NoLauncher)
}

/// [`detect`] over this process's real environment.
pub fn detect_from_process(fallback_size: Option<usize>) -> Result<RankEnv, DetectError> {
    detect(|k| std::env::var(k).ok(), fallback_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn openmpi_variables_give_rank_size_and_local_rank() {
        let e = detect(
            env(&[
                ("OMPI_COMM_WORLD_RANK", "3"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                ("PMIX_RANK", "3"),
                ("PMIX_NAMESPACE", "prterun-host-1234@1"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!((e.rank, e.size, e.local_rank), (3, 4, 1));
        assert_eq!(e.launcher, LauncherKind::OpenMpi);
        assert_eq!(e.run_id.as_deref(), Some("prterun-host-1234@1"));
    }

    #[test]
    fn slurm_variables_give_rank_nodelist_and_job() {
        let e = detect(
            env(&[
                ("SLURM_PROCID", "5"),
                ("SLURM_NTASKS", "8"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_STEP_NODELIST", "node[01-04]"),
                ("SLURM_JOB_ID", "4242"),
                ("SLURM_STEP_ID", "0"),
                ("PMIX_RANK", "5"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!((e.rank, e.size, e.local_rank), (5, 8, 1));
        assert_eq!(e.launcher, LauncherKind::Slurm);
        assert_eq!(e.slurm_nodelist.as_deref(), Some("node[01-04]"));
        assert_eq!(e.slurm_job, Some((4242, 0)));
        assert_eq!(e.run_id.as_deref(), Some("slurm-4242.0"));
    }

    #[test]
    fn mpirun_inside_a_slurm_allocation_trusts_mpirun() {
        let e = detect(
            env(&[
                ("OMPI_COMM_WORLD_RANK", "2"),
                ("OMPI_COMM_WORLD_SIZE", "16"),
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!((e.rank, e.size), (2, 16));
        assert_eq!(e.launcher, LauncherKind::OpenMpi);
    }

    #[test]
    fn pmi_variables_give_rank_and_size() {
        let e = detect(
            env(&[
                ("PMI_RANK", "1"),
                ("PMI_SIZE", "2"),
                ("MPI_LOCALRANKID", "1"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!((e.rank, e.size, e.local_rank), (1, 2, 1));
        assert_eq!(e.launcher, LauncherKind::Pmi);
    }

    #[test]
    fn bare_pmix_takes_its_size_from_the_job_file() {
        let vars = env(&[("PMIX_RANK", "2"), ("PMIX_LOCAL_RANK", "2")]);
        let e = detect(&vars, Some(4)).unwrap();
        assert_eq!((e.rank, e.size, e.local_rank), (2, 4, 2));
        assert_eq!(e.launcher, LauncherKind::Pmix);
        assert_eq!(detect(&vars, None), Err(DetectError::PmixWithoutSize));
    }

    #[test]
    fn torchrun_style_variables_are_the_last_resort() {
        let e = detect(
            env(&[
                ("RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("TORCHELASTIC_RUN_ID", "abc"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!((e.rank, e.size, e.local_rank), (0, 1, 0));
        assert_eq!(e.launcher, LauncherKind::Generic);
        assert_eq!(e.run_id.as_deref(), Some("abc"));
    }

    #[test]
    fn no_launcher_variables_is_an_error() {
        assert_eq!(
            detect(env(&[("HOME", "/root")]), Some(4)),
            Err(DetectError::NoLauncher)
        );
    }

    #[test]
    fn rank_outside_the_world_is_an_error() {
        assert!(matches!(
            detect(env(&[("RANK", "4"), ("WORLD_SIZE", "4")]), None),
            Err(DetectError::RankOutOfRange {
                rank: 4,
                size: 4,
                ..
            })
        ));
    }

    #[test]
    fn garbage_in_a_variable_names_the_variable() {
        let err = detect(env(&[("SLURM_PROCID", "x1"), ("SLURM_NTASKS", "2")]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SLURM_PROCID=\"x1\" is not a non-negative integer"
        );
    }
}
