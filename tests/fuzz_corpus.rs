//! Replays the committed corpus of every fuzz target (`fuzz/corpus/NAME/`)
//! and every input that once crashed one (`fuzz/regressions/NAME/`)
//! through the property it fuzzes (`swarmrun::fuzzing`), so the decoders
//! of outside bytes are checked on every test run, without nightly Rust.

use std::path::{Path, PathBuf};

use swarmrun::fuzzing;

/// A fuzz target's property.
type Property = fn(&[u8]);

const TARGETS: [(&str, Property); 5] = [
    ("wire_frames", fuzzing::wire_frames),
    ("boundary_frame", fuzzing::boundary_frame),
    ("job_file", fuzzing::job_file),
    ("ledger", fuzzing::ledger),
    ("manifest", fuzzing::manifest),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, or none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_keeps_its_target_s_property() {
    for (name, property) in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} has no seeds");
        let regressions = inputs(&fuzz_dir().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let bytes = std::fs::read(path).unwrap();
            let caught = std::panic::catch_unwind(|| property(&bytes));
            assert!(caught.is_ok(), "{}", path.display());
        }
    }
}

/// The generated raw TCP streams begin with this build's frame header:
/// seeds of another wire version stop at the version check, so a fuzzer
/// started from them would reach nothing past it until it guessed the byte.
/// After a bump of `wire::VERSION`, regenerate them (`write_generated_seeds`).
#[test]
fn raw_wire_seeds_speak_this_builds_wire_version() {
    let dir = fuzz_dir().join("corpus").join("wire_frames");
    let raw: Vec<PathBuf> = inputs(&dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("_raw"))
        .collect();
    assert!(!raw.is_empty(), "no raw seeds in {}", dir.display());
    for path in raw {
        let bytes = std::fs::read(&path).unwrap();
        // The mode byte, then the first frame's magic and version.
        assert_eq!(
            bytes.get(1..6),
            Some(&[b'S', b'W', b'R', b'M', swarmrun::wire::VERSION][..]),
            "{}",
            path.display()
        );
    }
}

/// The fuzz targets in `fuzz/Cargo.toml` are the ones replayed here.
#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "swarmrun-fuzz")
        .collect();
    let replayed: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(declared, replayed);
}

/// Writes the generated seeds of `wire_frames` and `boundary_frame` (the
/// others are files of real runs: see fuzz/README.md).
#[test]
#[ignore = "writes fuzz/corpus; run once: cargo test --test fuzz_corpus -- --ignored"]
fn write_generated_seeds() {
    use swarmrun::compress::{frame, quantize, Bits, Rounding};
    use swarmrun::wire::{FrameKind, StripeHead};

    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let head = StripeHead {
        message: 1,
        part: 0,
        parts: 1,
    }
    .encode();
    let stripe = |data: &[u8]| [&head[..], data].concat();
    type Frames = Vec<(FrameKind, u8, Vec<u8>)>;
    let streams: [(&str, Frames); 4] = [
        ("data", vec![(FrameKind::Data, 5, b"abc".to_vec())]),
        (
            "data_more",
            vec![
                (FrameKind::DataMore, 5, b"ab".to_vec()),
                (FrameKind::Data, 5, b"c".to_vec()),
                (FrameKind::Data, 6, Vec::new()),
            ],
        ),
        (
            "stripe",
            vec![
                (FrameKind::StripeMore, 9, stripe(b"xy")),
                (FrameKind::Stripe, 9, stripe(b"z")),
            ],
        ),
        (
            "close",
            vec![
                (FrameKind::Data, 1, b"bye".to_vec()),
                (FrameKind::Close, 0, Vec::new()),
            ],
        ),
    ];
    for (name, frames) in streams {
        let mut records = vec![1u8];
        let mut raw = vec![0u8];
        let mut session = fuzzing::wire_session();
        for (kind, tag, payload) in &frames {
            records.extend([*kind as u8 - 1, *tag, payload.len() as u8]);
            records.extend_from_slice(payload);
            session
                .write(&mut raw, *kind, u64::from(*tag), &[payload])
                .unwrap();
        }
        write("wire_frames", &format!("{name}_records"), &records);
        write("wire_frames", &format!("{name}_raw"), &raw);
    }
    let values: Vec<f32> = (0..16 * 8)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    for (bits, name) in [(Bits::Int8, "int8"), (Bits::Int4, "int4")] {
        let q = quantize(&values, 16, 8, bits, Rounding::Nearest).unwrap();
        for zstd in [false, true] {
            let bytes = frame::encode(&q, zstd).unwrap();
            write("boundary_frame", &format!("{name}_zstd_{zstd}"), &bytes);
        }
    }
    write("boundary_frame", "f32", bytemuck::cast_slice(&values));
}
