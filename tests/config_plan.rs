//! Valid job files: what they parse to, and the rank plans they give.

use std::path::{Path, PathBuf};

use swarmrun::config::{self, Fabric, JobSpec, PlanError, RankPlan, Rendezvous, Role, Task};

fn parse(text: &str) -> JobSpec {
    config::parse(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// A job with the given extra sections after a minimal `[job]`.
fn job(task: &str, rest: &str) -> JobSpec {
    parse(&format!("[job]\nname = \"t\"\ntask = \"{task}\"\n{rest}"))
}

fn hosts_and_locals(plan: &config::Plan) -> Vec<(&str, usize)> {
    plan.ranks
        .iter()
        .map(|r| (r.host.as_str(), r.local_rank))
        .collect()
}

#[test]
fn hello_job_file_parses_to_the_smoke_job() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hello.toml");
    let spec = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.job.name, "hello");
    assert_eq!(spec.job.task, Task::Hello);
    assert_eq!(spec.job.run_dir(), PathBuf::from("runs/hello"));
    assert_eq!(spec.sites.len(), 1);
    let site = &spec.sites[0];
    assert_eq!(site.name, "local");
    assert_eq!(site.hosts, ["localhost"]);
    assert_eq!(site.ranks_per_host, 4);
    assert_eq!(site.fabric, Fabric::Tcp);
    assert_eq!(spec.roles.validators, 0);
    assert_eq!(spec.pipeline.stages, 1);
    assert_eq!(
        spec.network.rendezvous,
        Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port: 29500
        }
    );

    let plan = spec.plan(None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.ranks.len(), 4);
    assert_eq!(plan.ranks[0].role, Role::Orchestrator);
    assert!(plan.ranks[1..]
        .iter()
        .all(|r| r.role == Role::Miner { stage: 0 }));
    assert_eq!(
        hosts_and_locals(&plan),
        [
            ("localhost", 0),
            ("localhost", 1),
            ("localhost", 2),
            ("localhost", 3)
        ]
    );
}

#[test]
fn omitted_sections_get_documented_defaults() {
    let spec = parse("[job]\nname = \"d\"\n[[site]]\nname = \"s\"\nhosts = \"h\"\n");
    assert_eq!(spec.job.seed, 0);
    assert_eq!(spec.job.task, Task::Train);
    assert_eq!(spec.job.run_dir(), PathBuf::from("runs/d"));
    assert_eq!(
        (spec.model.n_layer, spec.model.n_head, spec.model.n_embd),
        (4, 4, 128)
    );
    assert_eq!((spec.model.block_size, spec.model.dropout), (64, 0.0));
    assert_eq!(spec.pipeline.stages, 1);
    assert_eq!(spec.pipeline.layers, None);
    assert_eq!(spec.sites[0].ranks_per_host, 1);
    assert_eq!(spec.sites[0].fabric, Fabric::Tcp);
    assert_eq!(spec.network.rendezvous.to_string(), "tcp://127.0.0.1:29500");
    assert_eq!(spec.network.max_frame, 64 << 20);
    assert_eq!(spec.network.key_file, None);
    assert_eq!(spec.network.connect_timeout_s, 30.0);
    assert_eq!(spec.network.collective_timeout_s, 60.0);
}

#[test]
fn every_field_written_out_is_read_back() {
    let spec = parse(
        r#"
[job]
name = "full.run-1"
seed = 42
run_dir = "/scratch/full"
task = "train"

[model]
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2

[pipeline]
stages = 3
layers = [1, 2, 3]
microbatch_size = 4
microbatches_per_window = 16

[[site]]
name = "uni"
hosts = "node[01-02]"
ranks_per_host = 2
fabric = "nccl"
device = "cuda"

[[site]]
name = "lab"
hosts = "box"
fabric = "shm"

[roles]
validators = 2

[network]
rendezvous = "file:///shared/rdv"
max_frame = "1GiB"
key_file = "job.key"
connect_timeout_s = 5.0
collective_timeout_s = 120.5

[faults]
"#,
    );
    assert_eq!(spec.job.seed, 42);
    assert_eq!(spec.job.run_dir(), PathBuf::from("/scratch/full"));
    assert_eq!(spec.model.dropout, 0.2);
    assert_eq!(spec.stage_layers(), [1, 2, 3]);
    assert_eq!(spec.pipeline.microbatches_per_window, 16);
    assert_eq!(spec.sites[0].hosts, ["node01", "node02"]);
    assert_eq!(spec.sites[0].fabric, Fabric::Nccl);
    assert_eq!(spec.sites[0].device, config::Device::Cuda);
    assert_eq!(spec.sites[1].fabric, Fabric::Shm);
    assert_eq!(spec.roles.validators, 2);
    assert_eq!(
        spec.network.rendezvous,
        Rendezvous::File {
            dir: "/shared/rdv".into()
        }
    );
    assert_eq!(spec.network.max_frame, 1 << 30);
    assert_eq!(spec.network.key_file, Some(PathBuf::from("job.key")));
    assert_eq!(spec.network.collective_timeout_s, 120.5);
}

#[test]
fn max_frame_accepts_plain_byte_counts() {
    let spec = job(
        "hello",
        "[[site]]\nname = \"s\"\nhosts = \"h\"\n[network]\nmax_frame = 4096\n",
    );
    assert_eq!(spec.network.max_frame, 4096);
}

#[test]
fn stage_layers_split_evenly_with_earlier_stages_taking_the_remainder() {
    let spec = job(
        "train",
        "[model]\nn_layer = 7\n[pipeline]\nstages = 3\n[[site]]\nname = \"s\"\nhosts = \"h\"\n",
    );
    assert_eq!(spec.stage_layers(), [3, 2, 2]);
}

#[test]
fn oversubscribed_ranks_wrap_around_the_slots_in_order() {
    let spec = job(
        "hello",
        "[[site]]\nname = \"s\"\nhosts = \"n[1-2]\"\nranks_per_host = 2\n",
    );
    let plan = spec.plan(Some(7)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        hosts_and_locals(&plan),
        [
            ("n1", 0),
            ("n1", 1),
            ("n2", 0),
            ("n2", 1),
            ("n1", 2),
            ("n1", 3),
            ("n2", 2),
        ]
    );
}

#[test]
fn fewer_ranks_than_slots_fill_the_first_slots() {
    let spec = job(
        "hello",
        "[[site]]\nname = \"s\"\nhosts = \"n[1-2]\"\nranks_per_host = 2\n",
    );
    let plan = spec.plan(Some(3)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hosts_and_locals(&plan), [("n1", 0), ("n1", 1), ("n2", 0)]);
}

#[test]
fn slots_follow_site_order_and_local_ranks_are_per_site_and_host() {
    let spec = job(
        "hello",
        "[[site]]\nname = \"b\"\nhosts = \"x\"\nranks_per_host = 2\n\
         [[site]]\nname = \"a\"\nhosts = \"x,y\"\n",
    );
    let plan = spec.plan(None).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(&str, &str, usize)> = plan
        .ranks
        .iter()
        .map(|r| (r.site.as_str(), r.host.as_str(), r.local_rank))
        .collect();
    assert_eq!(
        got,
        [("b", "x", 0), ("b", "x", 1), ("a", "x", 0), ("a", "y", 0)]
    );
}

#[test]
fn roles_are_orchestrator_then_validators_then_miners_round_robin_over_stages() {
    let spec = job(
        "train",
        "[pipeline]\nstages = 2\n[roles]\nvalidators = 1\n\
         [[site]]\nname = \"s\"\nhosts = \"h[1-3]\"\nranks_per_host = 2\n",
    );
    let plan = spec.plan(Some(6)).unwrap_or_else(|e| panic!("{e}"));
    let roles: Vec<Role> = plan.ranks.iter().map(|r| r.role).collect();
    assert_eq!(
        roles,
        [
            Role::Orchestrator,
            Role::Validator,
            Role::Miner { stage: 0 },
            Role::Miner { stage: 1 },
            Role::Miner { stage: 0 },
            Role::Miner { stage: 1 },
        ]
    );
    assert_eq!(
        plan.ranks[3],
        RankPlan {
            rank: 3,
            site: "s".into(),
            host: "h2".into(),
            local_rank: 1,
            role: Role::Miner { stage: 1 },
        }
    );
}

#[test]
fn training_without_a_miner_per_stage_says_how_many_ranks_it_needs() {
    let spec = job(
        "train",
        "[pipeline]\nstages = 2\n[roles]\nvalidators = 1\n[[site]]\nname = \"s\"\nhosts = \"h\"\n",
    );
    let err = spec
        .plan(Some(3))
        .expect_err("3 ranks cannot cover 2 stages");
    assert_eq!(
        err,
        PlanError::TooFewRanks {
            needed: 4,
            got: 3,
            stages: 2,
            validators: 1,
            standby: 0,
        }
    );
    assert!(err.to_string().contains("needs at least 4 ranks"), "{err}");
    assert!(err.to_string().contains("got 3"), "{err}");
}

#[test]
fn the_standby_comes_after_the_validators_and_before_the_miners() {
    let spec = job(
        "train",
        "[pipeline]\nstages = 2\n[roles]\nvalidators = 1\nstandby = 1\n\
         [[site]]\nname = \"s\"\nhosts = \"h\"\n",
    );
    let plan = spec.plan(Some(6)).unwrap();
    let roles: Vec<Role> = plan.ranks.iter().map(|r| r.role).collect();
    assert_eq!(
        roles,
        [
            Role::Orchestrator,
            Role::Validator,
            Role::Standby,
            Role::Miner { stage: 0 },
            Role::Miner { stage: 1 },
            Role::Miner { stage: 0 },
        ]
    );
    assert_eq!(spec.standby_rank(), Some(2));
    let err = spec
        .plan(Some(4))
        .expect_err("4 ranks leave a stage without a miner");
    assert!(err.to_string().contains("needs at least 5 ranks"), "{err}");
}

#[test]
fn hello_runs_on_a_single_rank() {
    let spec = job("hello", "[[site]]\nname = \"s\"\nhosts = \"h\"\n");
    let plan = spec.plan(None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.ranks.len(), 1);
    assert_eq!(plan.ranks[0].role, Role::Orchestrator);
}

#[test]
fn zero_world_size_is_rejected() {
    let spec = job("hello", "[[site]]\nname = \"s\"\nhosts = \"h\"\n");
    assert_eq!(spec.plan(Some(0)), Err(PlanError::NoRanks));
}

#[test]
fn role_labels_are_long_for_tables_and_short_for_prefixes() {
    let miner = Role::Miner { stage: 1 };
    assert_eq!(
        [
            Role::Orchestrator.to_string(),
            Role::Validator.to_string(),
            miner.to_string()
        ],
        ["orchestrator", "validator", "miner"]
    );
    assert_eq!(
        [
            Role::Orchestrator.short_label(),
            Role::Validator.short_label(),
            miner.short_label()
        ],
        ["orch", "val", "miner s1"]
    );
}

#[test]
fn rendered_plan_is_a_header_and_an_aligned_row_per_rank() {
    let spec = job(
        "train",
        "[pipeline]\nstages = 2\n[roles]\nvalidators = 1\n\
         [[site]]\nname = \"uni\"\nhosts = \"node[01-02]\"\nranks_per_host = 2\n\
         [[site]]\nname = \"lab\"\nhosts = \"box\"\n",
    );
    let plan = spec.plan(None).unwrap_or_else(|e| panic!("{e}"));
    let expected = "\
job t: 5 ranks, 2 stages, task train, rendezvous tcp://127.0.0.1:29500
rank  site  host    local  role          stage
0     uni   node01  0      orchestrator  -
1     uni   node01  1      validator     -
2     uni   node02  0      miner         0
3     uni   node02  1      miner         1
4     lab   box     0      miner         0
";
    assert_eq!(plan.render(), expected);
}

/// A site that serves one stage keeps that stage's miners (and its
/// all-reduce) at home; the other site's miners deal themselves over the
/// stages it names.
#[test]
fn a_site_that_serves_stages_gets_miners_of_those_stages_only() {
    let spec = job(
        "train",
        "[pipeline]\nstages = 2\n\n\
         [[site]]\nname = \"a\"\nhosts = \"h1\"\nranks_per_host = 3\nstages = [0]\n\n\
         [[site]]\nname = \"b\"\nhosts = \"h2\"\nranks_per_host = 2\nstages = [1]\n",
    );
    let plan = spec.plan(None).unwrap();
    let roles: Vec<(&str, Role)> = plan
        .ranks
        .iter()
        .map(|r| (r.site.as_str(), r.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("a", Role::Orchestrator),
            ("a", Role::Miner { stage: 0 }),
            ("a", Role::Miner { stage: 0 }),
            ("b", Role::Miner { stage: 1 }),
            ("b", Role::Miner { stage: 1 }),
        ]
    );
}

#[test]
fn stages_no_site_serves_are_refused_by_name() {
    let spec = job(
        "train",
        "[pipeline]\nstages = 3\n\n\
         [[site]]\nname = \"a\"\nhosts = \"h1\"\nranks_per_host = 5\nstages = [0, 1]\n",
    );
    let err = spec.plan(None).unwrap_err();
    assert!(
        matches!(err, PlanError::StageWithoutMiner { stage: 2 }),
        "{err}"
    );
}

#[test]
fn a_gpu_site_whose_passes_no_validator_can_replay_is_named() {
    // Ranks 0-1 (orchestrator, validator) on the CPU site, miners on GPUs.
    let two_sites = |gpu_ranks: u32| {
        job(
            "train",
            &format!(
                "[roles]\nvalidators = 1\n\n\
                 [[site]]\nname = \"cpus\"\nhosts = \"a\"\nranks_per_host = 2\n\n\
                 [[site]]\nname = \"gpus\"\nhosts = \"b\"\nranks_per_host = {gpu_ranks}\ndevice = \"cuda\"\n"
            ),
        )
    };
    let spec = two_sites(2);
    assert_eq!(spec.sites[1].device, config::Device::Cuda);
    assert_eq!(
        spec.sites[0].device,
        config::Device::Cpu,
        "cpu is the default"
    );
    let plan = spec.plan(None).unwrap();
    assert_eq!(
        plan.devices_without_validator(&spec),
        [config::Device::Cuda]
    );

    // With the validator on the GPU site too, nothing goes unreplayed.
    let spec = job(
        "train",
        "[roles]\nvalidators = 1\n\n\
         [[site]]\nname = \"gpus\"\nhosts = \"b\"\nranks_per_host = 4\ndevice = \"cuda\"\n",
    );
    let plan = spec.plan(None).unwrap();
    assert!(plan.devices_without_validator(&spec).is_empty());
}
