//! Constraints serde cannot express, checked on the deserialized
//! [`JobSpec`], and [`locate`], which finds the offending value in the text.

use std::collections::HashMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::{CheatKind, CrashPhase, Device, Fabric, JobSpec, Task};

/// The first broken constraint: the field path as written in the file
/// (`site[1].name`) and what is wrong with it.
#[derive(Debug)]
pub(crate) struct Violation {
    pub field: String,
    pub message: String,
}

fn violation(field: impl Into<String>, message: impl Into<String>) -> Result<(), Violation> {
    Err(Violation {
        field: field.into(),
        message: message.into(),
    })
}

const MIN_FRAME: usize = 4 << 10;
const MAX_FRAME: u64 = 4 << 30;

/// Checks the constraints documented on the `JobSpec` fields, in file order,
/// and reports the first one broken.
pub(crate) fn check(spec: &JobSpec) -> Result<(), Violation> {
    check_name("job.name", &spec.job.name)?;

    let m = &spec.model;
    for (field, value) in [
        ("n_layer", m.n_layer),
        ("n_head", m.n_head),
        ("n_embd", m.n_embd),
        ("block_size", m.block_size),
    ] {
        if value == 0 {
            return violation(format!("model.{field}"), "must be at least 1");
        }
    }
    if !m.n_embd.is_multiple_of(m.n_head) {
        return violation(
            "model.n_embd",
            format!(
                "n_embd = {} is not divisible by n_head = {}",
                m.n_embd, m.n_head
            ),
        );
    }
    if !(0.0..1.0).contains(&m.dropout) {
        return violation("model.dropout", format!("{} is not in [0, 1)", m.dropout));
    }

    let p = &spec.pipeline;
    if p.stages == 0 {
        return violation("pipeline.stages", "must be at least 1");
    }
    if p.stages > m.n_layer {
        return violation(
            "pipeline.stages",
            format!(
                "{} stages cannot share n_layer = {} blocks; every stage needs at least one",
                p.stages, m.n_layer
            ),
        );
    }
    if let Some(layers) = &p.layers {
        if layers.len() != p.stages {
            return violation(
                "pipeline.layers",
                format!(
                    "has {} entries but stages = {}; give one block count per stage",
                    layers.len(),
                    p.stages
                ),
            );
        }
        if let Some(i) = layers.iter().position(|&n| n == 0) {
            return violation(
                format!("pipeline.layers[{i}]"),
                "every stage needs at least one block",
            );
        }
        let sum: usize = layers.iter().sum();
        if sum != m.n_layer {
            return violation(
                "pipeline.layers",
                format!("sums to {sum} but model.n_layer = {}", m.n_layer),
            );
        }
    }
    if p.microbatch_size == 0 {
        return violation("pipeline.microbatch_size", "must be at least 1");
    }
    if p.microbatches_per_window == 0 {
        return violation("pipeline.microbatches_per_window", "must be at least 1");
    }
    // Each one is a contribution to its stage's fixed-point sum.
    let most = crate::collective::MAX_CONTRIBUTIONS;
    if p.microbatches_per_window > most {
        return violation(
            "pipeline.microbatches_per_window",
            format!("{} is more than {most}", p.microbatches_per_window),
        );
    }
    if let Some(b) = p.compression.bottleneck {
        if b == 0 || b > m.n_embd {
            return violation(
                "pipeline.compression.bottleneck",
                format!(
                    "{b} is not in 1..={}: the code is narrower than model.n_embd",
                    m.n_embd
                ),
            );
        }
    }

    if spec.sites.is_empty() {
        return violation("site", "at least one [[site]] is required");
    }
    let mut seen = HashMap::new();
    for (i, site) in spec.sites.iter().enumerate() {
        check_name(&format!("site[{i}].name"), &site.name)?;
        if let Some(first) = seen.insert(site.name.as_str(), i) {
            return violation(
                format!("site[{i}].name"),
                format!("duplicate site name `{}` (also site[{first}])", site.name),
            );
        }
        if site.ranks_per_host == 0 {
            return violation(format!("site[{i}].ranks_per_host"), "must be at least 1");
        }
        if site.fabric == Fabric::Nccl && site.device != Device::Cuda {
            return violation(
                format!("site[{i}].fabric"),
                "nccl moves data between GPUs: the site needs device = \"cuda\"",
            );
        }
        if let Some(s) = site.stages.iter().find(|&&s| s >= spec.pipeline.stages) {
            return violation(
                format!("site[{i}].stages"),
                format!(
                    "stage {s} does not exist: the pipeline has stages 0..{}",
                    spec.pipeline.stages
                ),
            );
        }
    }

    let n = &spec.network;
    if n.max_frame < MIN_FRAME || n.max_frame as u64 > MAX_FRAME {
        return violation(
            "network.max_frame",
            format!("{} bytes is outside 4KiB..=4GiB", n.max_frame),
        );
    }
    if let Some(listen) = &spec.metrics.listen {
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return violation(
                "metrics.listen",
                format!("{listen:?} is not an address and port such as \"127.0.0.1:9464\""),
            );
        }
    }
    if n.max_message < n.max_frame {
        return violation(
            "network.max_message",
            format!(
                "{} bytes is less than network.max_frame ({} bytes)",
                n.max_message, n.max_frame
            ),
        );
    }
    if n.shm_chunk == 0 || !n.shm_chunk.is_multiple_of(4096) {
        return violation(
            "network.shm_chunk",
            format!("{} bytes is not a positive multiple of 4 KiB", n.shm_chunk),
        );
    }
    for (field, value) in [
        ("connect_timeout_s", n.connect_timeout_s),
        ("collective_timeout_s", n.collective_timeout_s),
    ] {
        if !(value > 0.0 && value.is_finite()) {
            return violation(
                format!("network.{field}"),
                format!("{value} is not a positive number of seconds"),
            );
        }
    }

    if !(1..=64).contains(&n.lanes) {
        return violation("network.lanes", format!("{} is not in 1..=64", n.lanes));
    }
    for (field, rate) in [
        ("replay_rate", spec.roles.replay_rate),
        ("slice_audit_rate", spec.roles.slice_audit_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return violation(format!("roles.{field}"), format!("{rate} is not in 0..=1"));
        }
    }
    if spec.roles.slice_copies == 0 {
        return violation("roles.slice_copies", "must be at least 1");
    }
    if spec.roles.contribution_chunks == 0 {
        return violation("roles.contribution_chunks", "must be at least 1");
    }
    if spec.roles.standby > 1 {
        return violation(
            "roles.standby",
            format!(
                "{} standbys: at most 1 (one takes over; a second would only wait)",
                spec.roles.standby
            ),
        );
    }

    for (i, c) in spec.faults.crash.iter().enumerate() {
        if !(1..=255).contains(&c.exit_code) {
            return violation(
                format!("faults.crash[{i}].exit_code"),
                format!("{} is not an exit status in 1..=255", c.exit_code),
            );
        }
        if !(c.after_s >= 0.0 && c.after_s.is_finite()) {
            return violation(
                format!("faults.crash[{i}].after_s"),
                format!("{} is not a non-negative number of seconds", c.after_s),
            );
        }
        if c.window.is_some() && c.after_s != 0.0 {
            return violation(
                format!("faults.crash[{i}].window"),
                "give either `window` or `after_s`, not both",
            );
        }
        if c.phase != CrashPhase::Start && c.window.is_none() {
            return violation(
                format!("faults.crash[{i}].phase"),
                "a phase is part of a window: give `window` too",
            );
        }
        if c.window.is_some() && spec.job.task != Task::Train {
            return violation(
                format!("faults.crash[{i}].window"),
                "only a training job (`task = \"train\"`) has windows",
            );
        }
    }
    for (i, c) in spec.faults.cheat.iter().enumerate() {
        if !(0.0..=1.0).contains(&c.probability) {
            return violation(
                format!("faults.cheat[{i}].probability"),
                format!("{} is not in 0..=1", c.probability),
            );
        }
        if spec.job.task != Task::Train {
            return violation(
                format!("faults.cheat[{i}].kind"),
                "only a training job (`task = \"train\"`) has miners to cheat",
            );
        }
        if let Some(j) = spec.faults.cheat[..i].iter().position(|o| o.rank == c.rank) {
            return violation(
                format!("faults.cheat[{i}].rank"),
                format!(
                    "rank {} already cheats in faults.cheat[{j}]; a miner has one cheat",
                    c.rank
                ),
            );
        }
        let colluders = spec.faults.cheat.iter();
        if c.kind == CheatKind::Collude && colluders.filter(|o| o.kind == c.kind).count() < 2 {
            return violation(
                format!("faults.cheat[{i}].kind"),
                "`collude` needs at least two colluding ranks",
            );
        }
    }
    for (i, h) in spec.faults.hang.iter().enumerate() {
        if spec.job.task != Task::Train {
            return violation(
                format!("faults.hang[{i}].window"),
                "only a training job (`task = \"train\"`) has windows",
            );
        }
        if let Some(j) = spec.faults.hang[..i].iter().position(|o| o.rank == h.rank) {
            return violation(
                format!("faults.hang[{i}].rank"),
                format!("rank {} already hangs in faults.hang[{j}]", h.rank),
            );
        }
    }
    for (i, s) in spec.faults.slow.iter().enumerate() {
        if !(s.factor >= 1.0 && s.factor.is_finite()) {
            return violation(
                format!("faults.slow[{i}].factor"),
                format!("{} is not a finite factor of at least 1", s.factor),
            );
        }
        if let Some(j) = spec.faults.slow[..i].iter().position(|o| o.rank == s.rank) {
            return violation(
                format!("faults.slow[{i}].rank"),
                format!(
                    "rank {} is already slowed by faults.slow[{j}]; give one factor",
                    s.rank
                ),
            );
        }
        if spec.job.task != Task::Train {
            return violation(
                format!("faults.slow[{i}].rank"),
                "only a training job (`task = \"train\"`) has miners to slow down",
            );
        }
    }
    for (i, h) in spec.faults.hold.iter().enumerate() {
        if spec.job.task != Task::Train {
            return violation(
                format!("faults.hold[{i}].window"),
                "only a training job (`task = \"train\"`) has windows to hold",
            );
        }
        if h.joined == 0 && !h.left {
            return violation(
                format!("faults.hold[{i}]"),
                "hold until `joined = N` ranks joined, or until they `left = true`",
            );
        }
    }
    let t = &spec.train;
    if t.windows == 0 {
        return violation("train.windows", "must be at least 1");
    }
    if t.eval_every == 0 {
        return violation("train.eval_every", "must be at least 1");
    }
    if t.keep_checkpoints == 0 {
        return violation("train.keep_checkpoints", "must be at least 1");
    }
    for (field, value) in [
        ("lr", t.lr),
        ("min_lr", t.min_lr),
        ("weight_decay", t.weight_decay),
    ] {
        if !(value >= 0.0 && value.is_finite()) {
            return violation(
                format!("train.{field}"),
                format!("{value} is not a non-negative number"),
            );
        }
    }
    let b = &spec.bench;
    if b.min_bytes == 0 || b.min_bytes > b.max_bytes {
        return violation(
            "bench.min_bytes",
            format!("{} is not in 1..=max_bytes ({})", b.min_bytes, b.max_bytes),
        );
    }
    if b.registered && spec.network.shm_chunk < b.max_bytes {
        return violation(
            "bench.registered",
            format!(
                "registered buffers up to {} bytes need network.shm_chunk >= that (it is {})",
                b.max_bytes, spec.network.shm_chunk
            ),
        );
    }
    if b.iters == 0 {
        return violation("bench.iters", "must be at least 1");
    }
    if !(spec.hello.hold_s >= 0.0 && spec.hello.hold_s.is_finite()) {
        return violation(
            "hello.hold_s",
            format!(
                "{} is not a non-negative number of seconds",
                spec.hello.hold_s
            ),
        );
    }
    Ok(())
}

/// Job and site names end up in paths and log lines, so they are limited to
/// characters that are safe in both.
fn check_name(field: &str, name: &str) -> Result<(), Violation> {
    if name.is_empty() {
        return violation(field, "must not be empty");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return violation(
            field,
            format!("{c:?} is not allowed; use only A-Z a-z 0-9 _ . -"),
        );
    }
    Ok(())
}

/// Byte span of the value at `field` (`a.b[2].c`) in `text`. When the value
/// is not written in the file (a default broke a constraint), the span of the
/// nearest enclosing table or array that is; `None` if the text does not
/// parse, which cannot happen for text that deserialized.
pub(crate) fn locate(text: &str, field: &str) -> Option<Range<usize>> {
    let root = DeTable::parse(text).ok()?;
    let mut span = root.span();
    let root = DeValue::Table(root.into_inner());
    let mut node = &root;
    for step in steps(field) {
        let next = match step {
            Step::Key(key) => node.get(key),
            Step::Index(i) => node.get(i),
        };
        let Some(next) = next else { break };
        span = next.span();
        node = next.get_ref();
    }
    Some(span)
}

enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Splits `site[1].hosts` into `site`, `1`, `hosts`. Keys of a job file are
/// plain identifiers, so `.` and `[` never occur inside one.
fn steps(field: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in field.split('.') {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            out.push(Step::Key(key));
        }
        for index in pieces {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Step::Index(i));
            }
        }
    }
    out
}
