//! The live status page (`[metrics] listen`, path `/`) loaded in a real
//! headless Chromium while a real job trains: the miners it shows are the
//! plan's, a site that joins appears on it, the curves are drawn, and a
//! screenshot is kept (`target/tmp/status-page.png`).
//!
//! `[[faults.hold]]` holds the job before window 3 until a rank joined
//! and before window 8 until it left, so each load sees a known window
//! however busy the host is.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use swarmrun::config::Role;

use common::join::*;
use common::*;

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 1000;

/// Chromium from the distribution (`launch/test.sh` installs it).
fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .ok()?;
            let path = String::from_utf8(found.stdout).ok()?;
            found.status.success().then(|| PathBuf::from(path.trim()))
        })
        .expect("the status page test needs Chromium: apt install chromium (launch/test.sh does)")
}

/// Chromium, headless, with a profile of its own, given time for the
/// page's script to fetch and draw.
fn headless(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The page's DOM after its script ran.
fn dom(profile: &Path, url: &str) -> String {
    let out = headless(profile)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium: {}", stderr(&out));
    stdout(&out)
}

/// The value of attribute `name` in the tag text `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let start = tag
        .find(&format!(" {name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + name.len()
        + 3;
    &tag[start..start + tag[start..].find('"').unwrap()]
}

/// The page's member rows: (rank, role, stage, site, state).
fn members(dom: &str) -> Vec<(usize, String, String, String, String)> {
    dom.split("<tr class=\"member ")
        .skip(1)
        .map(|row| {
            let tag = &row[..row.find('>').unwrap()];
            let tag = format!(" {tag}");
            (
                attr(&tag, "data-rank").parse().unwrap(),
                attr(&tag, "data-role").to_string(),
                attr(&tag, "data-stage").to_string(),
                attr(&tag, "data-site").to_string(),
                attr(&tag, "data-state").to_string(),
            )
        })
        .collect()
}

/// The points of the chart line of class `series`.
fn points(dom: &str, series: &str) -> usize {
    let Some(at) = dom.find(&format!("class=\"series-{series}\"")) else {
        return 0;
    };
    let line = &dom[dom[..at].rfind("<polyline").unwrap()..];
    attr(&line[..line.find('>').unwrap()], "points")
        .split(' ')
        .count()
}

#[test]
fn the_status_page_shows_the_planned_miners_a_joined_site_and_the_curves() {
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let extra = format!(
        "\n[faults]\nclock = \"model\"\n\n\
         [[faults.hold]]\nwindow = 3\njoined = 1\n\n\
         [[faults.hold]]\nwindow = 8\nleft = true\n\n\
         [metrics]\nlisten = \"127.0.0.1:{http}\"\n"
    );
    let job = joinable_job(dir.path(), "watched", port, 10, &extra);
    let plan = swarmrun::config::load(&job).unwrap().plan(None).unwrap();
    let url = format!("http://127.0.0.1:{http}/");
    let profile = dir.path().join("chromium");

    let mut launch = Launched::start(&job);
    launch.read_until("status: http://");
    launch.read_until("window     2");

    // Held before window 3: the plan's ranks, as planned.
    let before = dom(&profile, &url);
    assert!(before.contains("data-window=\"2\""), "{before}");
    let shown = members(&before);
    let expected: Vec<_> = plan
        .ranks
        .iter()
        .filter_map(|r| match r.role {
            Role::Miner { stage } => Some((r.rank, "miner", stage.to_string())),
            Role::Validator => Some((r.rank, "validator", String::new())),
            _ => None,
        })
        .collect();
    assert_eq!(shown.len(), expected.len(), "{shown:?}");
    for (rank, role, stage) in expected {
        let row = shown.iter().find(|m| m.0 == rank).unwrap();
        assert_eq!((row.1.as_str(), &row.2), (role, &stage), "rank {rank}");
        assert_eq!((row.3.as_str(), row.4.as_str()), ("local", "serving"));
    }
    assert!(
        !before.contains("<td class=\"l\">?</td>"),
        "a host is missing"
    );
    assert_eq!(points(&before, "train"), 3);

    // A rank of site "lab" joins; the job trains to window 7 and holds.
    let rdzv = format!("tcp://127.0.0.1:{port}");
    let joiner = start(
        swarmrun()
            .args(["join", "--site", "lab", "--rdzv", &rdzv])
            .arg(&job),
        KEY,
    );
    launch.read_until("joined stage");
    launch.read_until("window     7");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let taken = headless(&profile)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("--window-size={WIDTH},{HEIGHT}"))
        .arg(&url)
        .output()
        .unwrap();
    assert!(taken.status.success(), "chromium: {}", stderr(&taken));
    let after = dom(&profile, &url);
    assert!(after.contains("data-window=\"7\""), "{after}");
    let lab: Vec<_> = members(&after)
        .into_iter()
        .filter(|m| m.3 == "lab")
        .collect();
    assert_eq!(lab.len(), 1, "{after}");
    assert_eq!((lab[0].1.as_str(), lab[0].4.as_str()), ("miner", "serving"));
    assert!(!lab[0].2.is_empty(), "the joiner is on a stage");
    assert!(
        after.contains(&format!("rank {} joined", lab[0].0)),
        "{after}"
    );
    assert_eq!(points(&after, "train"), 8);
    assert!(points(&after, "val") >= 1, "a validation point: {after}");

    kill(Pid::from_raw(joiner.id() as i32), Signal::SIGTERM).unwrap();
    let left = joiner.wait_with_output().unwrap();
    assert!(left.status.success(), "{}", stderr(&left));
    let (status, text, err) = launch.finish();
    assert!(status.success(), "{text}\n{err}");

    // The screenshot is the page at its size, with something drawn on it.
    let decoder = png::Decoder::new(std::fs::File::open(&shot).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
    let colours: std::collections::BTreeSet<&[u8]> = pixels[..info.buffer_size()]
        .chunks(info.color_type.samples())
        .collect();
    assert!(
        colours.len() > 20,
        "a blank page: {} colours",
        colours.len()
    );
    println!("status page screenshot: {}", shot.display());
}
