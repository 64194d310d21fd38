//! Two "sites" on one machine joined by an emulated wide-area link, for
//! testing and benchmarking what crosses sites: network namespaces
//! `NAME-a` and `NAME-b` (10.77.0.1 and 10.77.0.2), each with a veth pair
//! into a third namespace `NAME-r`, where [`bridge::run`] passes frames
//! between them after a delay, with jitter and loss, and the kernel's
//! `tbf` qdisc caps the bandwidth each way.
//!
//! This kernel has no `netem`, so delay and loss are ours: a userspace
//! bridge of raw frames, whose dropped frames are real packet loss that
//! TCP recovers from as it would on the internet. Needs root (namespaces,
//! `ip`, `tc`, `ethtool`).

pub mod bridge;
mod raw;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use thiserror::Error;

pub use bridge::Impairment;

/// Address of site a's namespace; site b's is [`SITE_B`].
pub const SITE_A: &str = "10.77.0.1";
pub const SITE_B: &str = "10.77.0.2";

#[derive(Debug, Error)]
pub enum WanError {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("a name of 1 to 8 letters, digits or `-` keeps interface names legal, not {0:?}")]
    BadName(String),
}

/// The link between the sites.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSpec {
    /// `tc` rate each way (`100mbit`, `1gbit`); `None` leaves it uncapped.
    pub rate: Option<String>,
    /// Round trip the link adds (half each way).
    pub rtt: Duration,
    pub jitter: Duration,
    pub loss: f64,
}

impl LinkSpec {
    /// What the bridge does each way.
    pub fn impairment(&self, seed: u64) -> Impairment {
        Impairment {
            delay: self.rtt / 2,
            jitter: self.jitter,
            loss: self.loss,
            seed,
        }
    }
}

/// The namespaces and interfaces of a two-site setup called `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sites {
    pub name: String,
}

impl Sites {
    pub fn new(name: &str) -> Result<Sites, WanError> {
        let legal = !name.is_empty()
            && name.len() <= 8
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !legal {
            return Err(WanError::BadName(name.to_string()));
        }
        Ok(Sites {
            name: name.to_string(),
        })
    }

    /// The namespace of site `a` or `b`, or `r` for the link.
    pub fn namespace(&self, which: char) -> String {
        format!("{}-{which}", self.name)
    }

    /// The link's interfaces in namespace `r`, towards a and b.
    pub fn link_interfaces(&self) -> (String, String) {
        (format!("{}-ra", self.name), format!("{}-rb", self.name))
    }

    /// Where the bridge's pid is kept while it runs.
    fn pid_file(&self) -> PathBuf {
        PathBuf::from(format!("/run/swarmrun-wan-{}.pid", self.name))
    }

    /// Creates both sites and the link's namespace, shapes the link's
    /// bandwidth and starts the bridge (`exe wan bridge`, detached, in
    /// namespace `r`). Whatever is left of an earlier setup of this name is
    /// removed first.
    pub fn up(&self, link: &LinkSpec, exe: &Path, seed: u64) -> Result<(), WanError> {
        self.down();
        self.build(link)?;
        let (ra, rb) = self.link_interfaces();
        let i = link.impairment(seed);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace('r')])
            .arg(exe)
            .args(["wan", "bridge", &ra, &rb])
            .args(["--delay-us", &i.delay.as_micros().to_string()])
            .args(["--jitter-us", &i.jitter.as_micros().to_string()])
            .args(["--loss", &i.loss.to_string(), "--seed", &seed.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| WanError::Command {
                command: "ip netns exec ... swarmrun wan bridge".into(),
                detail: e.to_string(),
            })?;
        std::fs::write(self.pid_file(), child.id().to_string()).map_err(|e| WanError::Command {
            command: format!("writing {}", self.pid_file().display()),
            detail: e.to_string(),
        })?;
        Ok(())
    }

    fn build(&self, link: &LinkSpec) -> Result<(), WanError> {
        let (r, ra, rb) = (
            self.namespace('r'),
            self.link_interfaces().0,
            self.link_interfaces().1,
        );
        for which in ['a', 'b', 'r'] {
            run(&["ip", "netns", "add", &self.namespace(which)])?;
        }
        for (which, address, end) in [('a', SITE_A, &ra), ('b', SITE_B, &rb)] {
            let ns = self.namespace(which);
            let dev = format!("{}-v{which}", self.name);
            run(&[
                "ip", "link", "add", &dev, "netns", &ns, "type", "veth", "peer", "name", end,
                "netns", &r,
            ])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                &dev,
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", &dev, "up"])?;
            run(&["ip", "-n", &r, "link", "set", end, "up", "promisc", "on"])?;
            // Frames must cross whole and with their checksums done: a raw
            // socket sees what the stack hands the device.
            for (space, device) in [(&ns, &dev), (&r, end)] {
                run(&[
                    "ip", "netns", "exec", space, "ethtool", "-K", device, "tx", "off", "rx",
                    "off", "tso", "off", "gso", "off", "gro", "off",
                ])?;
            }
            if let Some(rate) = &link.rate {
                let latency = format!("{}ms", (link.rtt.as_millis() as u64).max(50) * 2);
                run(&[
                    "ip", "netns", "exec", &r, "tc", "qdisc", "add", "dev", end, "root", "tbf",
                    "rate", rate, "burst", "256kb", "latency", &latency,
                ])?;
            }
        }
        Ok(())
    }

    /// Stops the bridge and removes both sites and the link (their
    /// interfaces go with them).
    pub fn down(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.pid_file()) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = std::fs::remove_file(self.pid_file());
        }
        for which in ['a', 'b', 'r'] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(which)])
                .output();
        }
    }
}

fn run(args: &[&str]) -> Result<(), WanError> {
    let command = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| WanError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(WanError::Command {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
