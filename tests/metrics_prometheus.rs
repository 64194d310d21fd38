//! `[metrics] listen`: a real training run scraped over HTTP while it
//! trains, its values checked against the run's own `metrics.jsonl` and
//! ledger.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::train::*;
use common::*;

/// The body of `GET /metrics` at `port`, or `None` while nothing listens.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    Some(body.to_string())
}

/// The value of the sample `name` (with its labels) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_run_scraped_while_it_trains_shows_its_window_loss_and_credits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let job = train_job(dir.path(), "scraped", 2, 60, &extra);
    let mut child = swarmrun().arg("launch").arg(&job).spawn().unwrap();
    // Scrape until a window past the third is shown, while it trains.
    let mut seen = None;
    while child.try_wait().unwrap().is_none() {
        if let Some(text) = scrape(port) {
            if sample(&text, "swarmrun_window").is_some_and(|w| w >= 3.0) {
                seen = Some(text);
                break;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    let text = seen.expect("the run ended before a scrape showed window 3");
    let status = child.wait().unwrap();
    assert!(status.success());

    let window = sample(&text, "swarmrun_window").unwrap() as u64;
    let lines = metrics_of(&job);
    let line = &lines[window as usize];
    assert_eq!(field(line, "window"), window.to_string());
    let jsonl = |f: &str| field(line, f).parse::<f64>().unwrap();
    // Losses are f32 written exactly in the file; the scrape holds the
    // same f32 widened.
    assert_eq!(
        sample(&text, "swarmrun_loss").unwrap() as f32,
        jsonl("loss") as f32
    );
    assert!(
        (sample(&text, "swarmrun_tokens_per_second").unwrap() - jsonl("tokens_per_s")).abs() < 0.1
    );
    assert!((sample(&text, "swarmrun_bubble_ratio").unwrap() - jsonl("bubble")).abs() < 1e-4);
    assert_eq!(
        sample(&text, "swarmrun_progress_deadline_seconds"),
        Some(jsonl("progress_deadline_s"))
    );
    assert_eq!(
        sample(&text, "swarmrun_windows_total"),
        Some((window + 1) as f64)
    );
    let cause = |c: &str| {
        sample(
            &text,
            &format!("swarmrun_bubble_cause_ratio{{cause=\"{c}\"}}"),
        )
    };
    for c in ["wait", "reduce", "step", "audit", "idle"] {
        let scraped = cause(c).unwrap();
        assert!(
            (scraped - jsonl(&format!("bubble_{c}"))).abs() < 1e-4,
            "{c}"
        );
    }
    // Boundary bytes so far, summed over the file's windows.
    let so_far = |f: &str| -> f64 {
        lines[..=window as usize]
            .iter()
            .map(|l| field(l, f).parse::<f64>().unwrap())
            .sum()
    };
    for kind in ["dense", "wire"] {
        let name = format!("swarmrun_boundary_bytes_total{{kind=\"{kind}\"}}");
        assert_eq!(sample(&text, &name), Some(so_far(&format!("{kind}_bytes"))));
    }
    assert!(so_far("wire_bytes") > 0.0);
    for passes in ["trained", "replayed"] {
        let name = format!("swarmrun_{passes}_passes_total");
        assert_eq!(sample(&text, &name), Some(so_far(passes)), "{name}");
    }
    assert!(so_far("trained") > 0.0);
    // The causes split the bubble: none negative, and with the idle rest
    // they add up to it.
    for l in &lines {
        let f = |name: &str| field(l, name).parse::<f64>().unwrap();
        let causes = ["wait", "reduce", "step", "audit", "idle"].map(|c| f(&format!("bubble_{c}")));
        assert!(causes.iter().all(|&c| c >= 0.0), "{l}");
        assert!(causes.iter().sum::<f64>() >= f("bubble") - 1e-3, "{l}");
    }

    // Each miner's credited passes so far, as the ledger has them.
    let chain = swarmrun::ledger::read(&job.with_extension("")).unwrap();
    let upto = chain.records.iter().filter(|r| r.window <= window);
    let mut per_miner = std::collections::BTreeMap::new();
    for m in upto.flat_map(|r| &r.miners) {
        *per_miner.entry((m.rank, m.stage)).or_insert(0u64) += m.verified;
    }
    assert_eq!(per_miner.len(), 4, "{per_miner:?}");
    for ((rank, stage), passes) in per_miner {
        let name = format!("swarmrun_miner_passes_total{{rank=\"{rank}\",stage=\"{stage}\"}}");
        assert_eq!(
            sample(&text, &name),
            Some(passes as f64),
            "{name} in\n{text}"
        );
    }
}
