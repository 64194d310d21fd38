//! `swarmrun plot RUN_DIR`: the charts of a real run's metrics, as PNGs of
//! the stated size with something drawn on them.

mod common;

use std::path::Path;

use common::train::*;
use common::*;

/// Width, height and the share of pixels that are not the white
/// background, of the PNG at `path`.
fn inspect(path: &Path) -> (u32, u32, f64, usize) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let channels = info.color_type.samples();
    let pixels = &pixels[..info.buffer_size()];
    let drawn = pixels
        .chunks(channels)
        .filter(|p| p[..3] != [255, 255, 255])
        .count();
    let colours: std::collections::BTreeSet<&[u8]> = pixels.chunks(channels).collect();
    let total = (info.width * info.height) as f64;
    (info.width, info.height, drawn as f64 / total, colours.len())
}

#[test]
fn plot_draws_loss_throughput_and_compression_charts_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let codec = "\n[pipeline.compression]\nquant = \"int8\"\n";
    let job = train_job(dir.path(), "plotted", 2, 12, codec);
    run(&job);
    let run_dir = dir.path().join("plotted");
    let charts = dir.path().join("charts");
    let out = swarmrun()
        .arg("plot")
        .arg(&run_dir)
        .arg("--out")
        .arg(&charts)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for name in ["loss.png", "throughput.png", "compression.png"] {
        let path = charts.join(name);
        assert!(text.contains(&path.display().to_string()), "{text}");
        let (w, h, drawn, colours) = inspect(&path);
        assert_eq!((w, h), (1000, 600), "{name}");
        // Axes, labels and at least one line: far from blank, far from
        // filled.
        assert!(
            (0.01..0.6).contains(&drawn),
            "{name}: {drawn:.3} of the pixels drawn"
        );
        assert!(colours >= 3, "{name}: {colours} colours");
    }
}

#[test]
fn plot_of_a_directory_without_metrics_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = swarmrun().arg("plot").arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("metrics.jsonl"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
