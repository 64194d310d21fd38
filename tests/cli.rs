//! The command line as a user meets it: `check`, `keygen`, `rank` without a
//! launcher, bad job files.

mod common;

use common::*;

#[test]
fn check_prints_every_rank_with_site_host_role_and_stage() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "train.toml",
        "[job]\nname = \"two-sites\"\n\n[pipeline]\nstages = 2\n\n[roles]\nvalidators = 1\n\n\
         [[site]]\nname = \"uni\"\nhosts = \"node[01-02]\"\nranks_per_host = 2\n\n\
         [[site]]\nname = \"lab\"\nhosts = \"box\"\nranks_per_host = 2\n",
    );
    let out = swarmrun().arg("check").arg(&job).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 6, "{text}");
    assert!(
        rows[0].contains("uni") && rows[0].contains("node01") && rows[0].contains("orchestrator")
    );
    assert!(rows[1].contains("validator"));
    assert!(rows[5].contains("lab") && rows[5].contains("box") && rows[5].contains("miner"));
}

#[test]
fn a_bad_job_file_exits_2_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        dir.path(),
        "bad.toml",
        "[job]\nname = \"x\"\nseed = \"one\"\n\n[[site]]\nname = \"a\"\nhosts = \"h\"\n",
    );
    let out = swarmrun().arg("check").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(err.contains("job.seed"), "{err}");
}

#[test]
fn rank_without_any_launcher_says_so_and_exits_2() {
    let mut cmd = swarmrun();
    for (k, _) in std::env::vars() {
        if k.starts_with("OMPI_")
            || k.starts_with("SLURM_")
            || k.starts_with("PMI")
            || k == "RANK"
            || k == "WORLD_SIZE"
        {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .arg("rank")
        .arg(repo_file("configs/hello.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no launcher found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.key");
    let out = swarmrun().arg("keygen").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let first = std::fs::read_to_string(&path).unwrap();
    assert_eq!(first.trim().len(), 64);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = swarmrun().arg("keygen").arg(&path).output().unwrap();
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
}

#[test]
fn ranks_with_different_keys_never_form_a_job() {
    // Two ranks started by hand, as under a broken launcher set-up: each has
    // its own key, so the rendezvous refuses the stranger and times out.
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 2, "connect_timeout_s = 2.0\n");
    let rdzv = format!("tcp://127.0.0.1:{}", free_port());
    let spawn = |rank: &str, key: &str| {
        swarmrun()
            .args(["rank", "--rdzv", &rdzv])
            .arg(&job)
            .env("RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("SWARMRUN_JOB_KEY", key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let r0 = spawn("0", &"11".repeat(32));
    let r1 = spawn("1", &"22".repeat(32));
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    assert!(!o0.status.success() && !o1.status.success());
    assert!(stderr(&o0).contains("refused"), "{}", stderr(&o0));
    assert!(!stdout(&o0).contains("barrier passed"));
}
