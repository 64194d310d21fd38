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
    use std::io::{BufRead, BufReader, Read};

    // Two ranks started by hand, as under a broken launcher set-up: each has
    // its own key, so rank 0 refuses the stranger and rank 1 gives up. No
    // clock decides the outcome: rank 1 retries until rank 0 listens, and
    // rank 0 is stopped once it has said what it refused.
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 2, "");
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
    let mut r0 = spawn("0", &"11".repeat(32));
    let r1 = spawn("1", &"22".repeat(32));
    let o1 = r1.wait_with_output().unwrap();
    assert!(!o1.status.success(), "{}", stderr(&o1));
    let mut refused = None;
    for line in BufReader::new(r0.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("refused") {
            refused = Some(line);
            break;
        }
    }
    r0.kill().unwrap();
    let mut out0 = String::new();
    r0.stdout.take().unwrap().read_to_string(&mut out0).unwrap();
    r0.wait().unwrap();
    assert!(refused.is_some(), "rank 0 never said it refused rank 1");
    assert!(!out0.contains("barrier passed"), "{out0}");
}

#[test]
fn a_stranger_with_a_wrong_key_is_refused_and_the_job_goes_on() {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    use swarmrun::wire::{AuthStream, Hello, JobKey, StreamOptions, WireError};

    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 2, "");
    let port = free_port();
    let rdzv = format!("tcp://127.0.0.1:{port}");
    let key = "33".repeat(32);
    let spawn = |rank: &str| {
        swarmrun()
            .args(["rank", "--rdzv", &rdzv])
            .arg(&job)
            .env("RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("SWARMRUN_JOB_KEY", &key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rank0 = spawn("0");
    // The stranger reaches rank 0 before rank 1 does, claiming to be rank 1.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("rank 0 never listened: {e}"),
        }
    };
    let wrong = JobKey::from_hex(&"44".repeat(32)).unwrap();
    let opts = StreamOptions {
        max_frame: 1 << 16,
        handshake_timeout: Duration::from_secs(5),
        seal_loopback: false,
    };
    let refused = AuthStream::client(stream, &wrong, Hello::new(1, "t"), opts);
    assert!(
        matches!(refused, Err(WireError::AuthFailed { .. })),
        "{refused:?}"
    );
    let rank1 = spawn("1");
    let (o0, o1) = (
        rank0.wait_with_output().unwrap(),
        rank1.wait_with_output().unwrap(),
    );
    assert!(o0.status.success(), "{}", stderr(&o0));
    assert!(o1.status.success(), "{}", stderr(&o1));
    assert!(stdout(&o0).contains("barrier passed"));
    assert!(
        stderr(&o0).contains("refused"),
        "rank 0 logs the stranger: {}",
        stderr(&o0)
    );
}

/// Without the `hwloc` feature a binding is refused before any rank starts,
/// naming the feature, never silently ignored.
#[cfg(not(feature = "hwloc"))]
#[test]
fn bind_to_core_without_the_hwloc_feature_exits_2_naming_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 2, "");
    for to in ["core", "numa"] {
        let out = swarmrun()
            .args(["launch", "-n", "2", "--bind-to", to])
            .arg(&job)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--features hwloc"), "{err}");
        assert!(err.contains(to), "{err}");
        assert!(!stdout(&out).contains("barrier passed"), "no rank ran");
    }
    // `none` needs nothing.
    let out = swarmrun()
        .args(["launch", "-n", "2", "--bind-to", "none"])
        .arg(&job)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A rank told to bind by its environment (mpirun -x SWARMRUN_BIND=core)
/// that cannot, or reads a misspelt value, says so and exits 2.
#[test]
fn a_bad_swarmrun_bind_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let job = hello_job(dir.path(), 1, "");
    let out = swarmrun()
        .arg("rank")
        .arg(&job)
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("SWARMRUN_BIND", "socket")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("SWARMRUN_BIND") && err.contains("socket"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_named_with_its_cause_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let out = swarmrun().arg("launch").arg(&missing).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&*missing.to_string_lossy()), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}
