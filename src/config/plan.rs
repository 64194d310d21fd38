//! The rank plan: which site, host, local rank and role each rank gets.
//!
//! Computed from the job file alone, so every rank derives the same plan
//! without talking to the others, and `swarmrun check` can show it before
//! anything is launched.

use std::collections::HashMap;
use std::fmt;

use thiserror::Error;

use super::{Device, JobSpec, Rendezvous, Task};

/// What a rank does in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Rank 0: owns the schedule and the ledger.
    Orchestrator,
    /// Re-runs sampled miner work.
    Validator,
    /// Holds the orchestrator's state as of the last closed window and
    /// takes over when the orchestrator is lost (`[roles] standby = 1`).
    Standby,
    /// Computes forward and backward for one pipeline stage (0-based).
    Miner { stage: usize },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Orchestrator => "orchestrator",
            Role::Validator => "validator",
            Role::Standby => "standby",
            Role::Miner { .. } => "miner",
        })
    }
}

impl Role {
    /// Short form for per-rank output prefixes such as `[r3 miner s1]`,
    /// where width matters more than clarity: `orch`, `val`, `miner s1`.
    pub fn short_label(&self) -> String {
        match self {
            Role::Orchestrator => "orch".to_string(),
            Role::Validator => "val".to_string(),
            Role::Standby => "standby".to_string(),
            Role::Miner { stage } => format!("miner s{stage}"),
        }
    }
}

/// Where one rank runs and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlan {
    pub rank: usize,
    pub site: String,
    pub host: String,
    /// How many lower ranks share this rank's site and host; the index for
    /// per-host resources such as GPUs or shared-memory segments.
    pub local_rank: usize,
    pub role: Role,
}

/// Every rank of a job, indexed by rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub job_name: String,
    pub task: Task,
    pub stages: usize,
    pub rendezvous: Rendezvous,
    pub ranks: Vec<RankPlan>,
}

/// Why no plan fits the job.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error("a job needs at least 1 rank, got 0")]
    NoRanks,
    #[error("the sites provide no slots (every site needs hosts and ranks_per_host >= 1)")]
    NoSlots,
    #[error(
        "training with {stages} stage(s), {validators} validator(s) and {standby} standby \
         needs at least {needed} ranks (1 orchestrator + {validators} validators + {standby} \
         standby + one miner per stage), got {got}"
    )]
    TooFewRanks {
        needed: usize,
        got: usize,
        stages: usize,
        validators: usize,
        standby: usize,
    },
    #[error(
        "no rank serves stage {stage}: the sites' `stages` leave it out, or there are too few \
         miners"
    )]
    StageWithoutMiner { stage: usize },
}

impl JobSpec {
    /// Maps ranks to slots and roles.
    ///
    /// Slots are the sites' hosts in file order, `ranks_per_host` per host.
    /// `world_size` is the rank count the launcher was given (`-n`,
    /// `SLURM_NTASKS`, ...); `None` means one rank per slot. More ranks than
    /// slots wrap around by slot, like `mpirun --oversubscribe`. Rank 0 is
    /// the orchestrator, the next `roles.validators` ranks validators, the
    /// next (with `roles.standby = 1`) the standby orchestrator, and the
    /// rest miners dealt round-robin over the stages, so that every
    /// stage gets a miner as early as possible.
    pub fn plan(&self, world_size: Option<usize>) -> Result<Plan, PlanError> {
        let slots: Vec<(&str, &str)> = self
            .sites
            .iter()
            .flat_map(|site| {
                site.hosts.iter().flat_map(move |host| {
                    (0..site.ranks_per_host).map(move |_| (site.name.as_str(), host.as_str()))
                })
            })
            .collect();
        if slots.is_empty() {
            return Err(PlanError::NoSlots);
        }
        let size = world_size.unwrap_or(slots.len());
        if size == 0 {
            return Err(PlanError::NoRanks);
        }
        let stages = self.pipeline.stages;
        let validators = self.roles.validators as usize;
        let standby = self.roles.standby as usize;
        let needed = 1 + validators + standby + stages;
        if self.job.task == Task::Train && size < needed {
            return Err(PlanError::TooFewRanks {
                needed,
                got: size,
                stages,
                validators,
                standby,
            });
        }

        let mut on_host: HashMap<(&str, &str), usize> = HashMap::new();
        let mut site_miners: HashMap<&str, usize> = HashMap::new();
        let ranks: Vec<RankPlan> = (0..size)
            .map(|rank| {
                let (site, host) = slots[rank % slots.len()];
                let local = on_host.entry((site, host)).or_default();
                let local_rank = *local;
                *local += 1;
                let role = match rank {
                    0 => Role::Orchestrator,
                    r if r <= validators => Role::Validator,
                    r if Some(r) == self.standby_rank() => Role::Standby,
                    r => {
                        let served = self.site(site).map_or(&[][..], |s| &s.stages[..]);
                        let nth = site_miners.entry(site).or_default();
                        *nth += 1;
                        // `max(1)`: a hand-built, unchecked spec with 0
                        // stages gets stage 0 instead of a division by zero.
                        let stage = match served {
                            [] => (r - 1 - validators - standby) % stages.max(1),
                            some => some[(*nth - 1) % some.len()],
                        };
                        Role::Miner { stage }
                    }
                };
                RankPlan {
                    rank,
                    site: site.to_string(),
                    host: host.to_string(),
                    local_rank,
                    role,
                }
            })
            .collect();
        if self.job.task == Task::Train {
            let served = |s: usize| {
                let miners = ranks.iter().filter(|r| r.role == Role::Miner { stage: s });
                miners.count() > 0
            };
            if let Some(stage) = (0..stages).find(|&s| !served(s)) {
                return Err(PlanError::StageWithoutMiner { stage });
            }
        }
        Ok(Plan {
            job_name: self.job.name.clone(),
            task: self.job.task,
            stages,
            rendezvous: self.network.rendezvous.clone(),
            ranks,
        })
    }
}

impl JobSpec {
    /// The standby orchestrator's rank, when the job has one: right after
    /// the validators, so that every rank finds it from the job file.
    pub fn standby_rank(&self) -> Option<usize> {
        (self.job.task == Task::Train && self.roles.standby > 0)
            .then_some(1 + self.roles.validators as usize)
    }
}

impl Plan {
    /// Devices that miners of this plan compute on and no validator does:
    /// validators replay passes only on the miner's kind of device (where
    /// the bits match), so those miners' passes go unreplayed. Empty when
    /// the job has no validators at all.
    pub fn devices_without_validator(&self, spec: &JobSpec) -> Vec<Device> {
        let device = |r: &RankPlan| spec.site(&r.site).map(|s| s.device).unwrap_or_default();
        let of_role = |miner: bool| {
            let ranks = self.ranks.iter();
            let ranks = ranks.filter(move |r| matches!(r.role, Role::Miner { .. }) == miner);
            ranks
                .filter(move |r| miner || r.role == Role::Validator)
                .map(device)
        };
        let validating: Vec<Device> = of_role(false).collect();
        let mut missing: Vec<Device> = of_role(true)
            .filter(|d| !validating.is_empty() && !validating.contains(d))
            .collect();
        missing.dedup();
        missing
    }

    /// What `swarmrun check JOB.toml` prints: a header line, then one row
    /// per rank with columns `rank site host local role stage`, aligned.
    pub fn render(&self) -> String {
        let header = ["rank", "site", "host", "local", "role", "stage"];
        let rows: Vec<[String; 6]> = self
            .ranks
            .iter()
            .map(|r| {
                let stage = match r.role {
                    Role::Miner { stage } => stage.to_string(),
                    _ => "-".to_string(),
                };
                [
                    r.rank.to_string(),
                    r.site.clone(),
                    r.host.clone(),
                    r.local_rank.to_string(),
                    r.role.to_string(),
                    stage,
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }

        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let mut out = format!(
            "job {}: {}, {}, task {}, rendezvous {}\n",
            self.job_name,
            plural(self.ranks.len(), "rank"),
            plural(self.stages, "stage"),
            self.task,
            self.rendezvous,
        );
        let header = header.map(str::to_string);
        for row in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}
