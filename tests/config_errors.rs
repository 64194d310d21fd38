//! Malformed job files under `tests/fixtures/config/bad/` and the errors
//! they must produce: the right file, line, column, field path and message.
//! Each fixture starts with a comment saying what is wrong with it.

use std::path::{Path, PathBuf};

use swarmrun::config::{self, ConfigError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config/bad")
        .join(format!("{name}.toml"))
}

/// Loads fixture `name`, expects an `Invalid` error and checks every part.
fn assert_error(name: &str, line: usize, column: usize, field: Option<&str>, fragment: &str) {
    let path = fixture(name);
    let err = match config::load(&path) {
        Ok(spec) => panic!("{name}: expected an error, got {spec:?}"),
        Err(err) => err,
    };
    let ConfigError::Invalid {
        file,
        line: got_line,
        column: got_column,
        field: got_field,
        message,
    } = &err
    else {
        panic!("{name}: expected ConfigError::Invalid, got {err:?}");
    };
    assert_eq!(file, &path, "{name}: file");
    assert_eq!((*got_line, *got_column), (line, column), "{name}: {err}");
    assert_eq!(got_field.as_deref(), field, "{name}: {err}");
    assert!(
        message.contains(fragment),
        "{name}: message {message:?} lacks {fragment:?}"
    );
}

#[test]
fn toml_syntax_error_has_position_but_no_field() {
    assert_error("toml_syntax", 3, 14, None, "invalid basic string");
}

#[test]
fn unknown_top_level_table_points_at_its_header_key() {
    assert_error(
        "unknown_table",
        5,
        2,
        Some("trainer"),
        "unknown field `trainer`, expected one of `job`",
    );
}

#[test]
fn unknown_key_in_job_points_at_the_key_and_names_it() {
    assert_error(
        "unknown_job_key",
        4,
        1,
        Some("job.owner"),
        "unknown field `owner`",
    );
}

#[test]
fn misspelled_key_lists_the_keys_that_exist() {
    assert_error(
        "misspelled_key",
        3,
        1,
        Some("job.nmae"),
        "unknown field `nmae`, expected one of `name`, `seed`, `run_dir`, `task`",
    );
}

#[test]
fn string_for_integer_points_at_the_value_in_the_right_site() {
    assert_error(
        "wrong_type",
        12,
        18,
        Some("site[1].ranks_per_host"),
        "invalid type: string \"four\", expected u32",
    );
}

#[test]
fn negative_number_for_unsigned_field_is_rejected() {
    assert_error(
        "negative_unsigned",
        4,
        8,
        Some("job.seed"),
        "invalid value: integer `-1`, expected u64",
    );
}

#[test]
fn missing_job_name_points_at_the_job_header() {
    assert_error(
        "missing_job_name",
        2,
        1,
        Some("job.name"),
        "missing field `name`",
    );
}

#[test]
fn job_without_sites_is_rejected() {
    assert_error("missing_site", 1, 1, Some("site"), "missing field `site`");
}

#[test]
fn site_without_hosts_points_at_that_sites_header() {
    assert_error(
        "site_missing_hosts",
        9,
        1,
        Some("site[1].hosts"),
        "missing field `hosts`",
    );
}

#[test]
fn unbalanced_hostlist_points_at_the_hosts_value() {
    assert_error(
        "hostlist_unbalanced",
        7,
        9,
        Some("site[0].hosts"),
        "bad hostlist: unbalanced brackets",
    );
}

#[test]
fn reversed_hostlist_range_is_rejected() {
    assert_error(
        "hostlist_reversed",
        7,
        9,
        Some("site[0].hosts"),
        "reversed range `04-01`",
    );
}

#[test]
fn duplicate_site_name_points_at_the_second_one() {
    assert_error(
        "duplicate_site",
        10,
        8,
        Some("site[1].name"),
        "duplicate site name `lab` (also site[0])",
    );
}

#[test]
fn zero_ranks_per_host_is_rejected() {
    assert_error(
        "ranks_per_host_zero",
        8,
        18,
        Some("site[0].ranks_per_host"),
        "must be at least 1",
    );
}

#[test]
fn n_embd_not_divisible_by_n_head_points_at_n_embd() {
    assert_error(
        "n_embd_not_divisible",
        7,
        10,
        Some("model.n_embd"),
        "n_embd = 130 is not divisible by n_head = 4",
    );
}

#[test]
fn pipeline_layers_of_wrong_length_are_rejected() {
    assert_error(
        "layers_wrong_length",
        7,
        10,
        Some("pipeline.layers"),
        "has 3 entries but stages = 2",
    );
}

#[test]
fn pipeline_layers_not_summing_to_n_layer_are_rejected() {
    assert_error(
        "layers_wrong_sum",
        7,
        10,
        Some("pipeline.layers"),
        "sums to 5 but model.n_layer = 4",
    );
}

#[test]
fn zero_stages_is_rejected() {
    assert_error(
        "stages_zero",
        6,
        10,
        Some("pipeline.stages"),
        "must be at least 1",
    );
}

#[test]
fn unknown_rendezvous_scheme_is_rejected() {
    assert_error(
        "rendezvous_scheme",
        10,
        14,
        Some("network.rendezvous"),
        "invalid rendezvous `udp://10.0.0.1:29500`: unknown scheme",
    );
}

#[test]
fn decimal_size_unit_in_max_frame_is_rejected() {
    assert_error(
        "max_frame_string",
        10,
        13,
        Some("network.max_frame"),
        "invalid size `64MB`",
    );
}

#[test]
fn max_frame_below_4_kib_is_rejected() {
    assert_error(
        "max_frame_too_small",
        10,
        13,
        Some("network.max_frame"),
        "1024 bytes is outside 4KiB..=4GiB",
    );
}

#[test]
fn unknown_fabric_lists_the_known_ones() {
    assert_error(
        "unknown_fabric",
        8,
        10,
        Some("site[0].fabric"),
        "unknown variant `infiniband`, expected one of `tcp`, `shm`, `mpi`, `nccl`",
    );
}

#[test]
fn nccl_on_a_cpu_site_is_refused() {
    assert_error(
        "nccl_without_cuda",
        9,
        10,
        Some("site[0].fabric"),
        "nccl moves data between GPUs: the site needs device = \"cuda\"",
    );
}

#[test]
fn unknown_device_names_the_choices() {
    assert_error(
        "unknown_device",
        9,
        10,
        Some("site[0].device"),
        "unknown variant `rocm`, expected `cpu` or `cuda`",
    );
}

#[test]
fn any_key_in_faults_is_rejected() {
    assert_error(
        "faults_key",
        11,
        1,
        Some("faults.kill_rank"),
        "unknown field `kill_rank`",
    );
}

#[test]
fn job_name_with_a_space_is_rejected() {
    assert_error("bad_job_name", 3, 8, Some("job.name"), "' ' is not allowed");
}

#[test]
fn values_in_dotted_keys_and_inline_tables_are_located_too() {
    assert_error(
        "dotted_inline_site",
        5,
        48,
        Some("site[1].ranks_per_host"),
        "must be at least 1",
    );
}

#[test]
fn every_bad_fixture_fails_to_load() {
    // Guards against a fixture that is added without a test, or that stops
    // failing because a check was dropped.
    let dir = fixture("x").with_file_name("");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fixture directory is readable") {
        let path = entry.expect("fixture entry is readable").path();
        assert!(config::load(&path).is_err(), "{} loaded", path.display());
        count += 1;
    }
    assert_eq!(count, 65);
}

#[test]
fn invalid_error_displays_as_file_line_col_field_message() {
    let err = config::load(&fixture("wrong_type")).expect_err("fixture is invalid");
    let file = fixture("wrong_type");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:12:18: field `site[1].ranks_per_host`: invalid type: string \"four\", expected u32",
            file.display()
        )
    );
}

#[test]
fn error_display_leaves_out_the_field_when_none_applies() {
    let err = config::parse("[job\n", Path::new("configs/bad.toml")).expect_err("bad TOML");
    let text = err.to_string();
    assert!(text.starts_with("configs/bad.toml:1:5: "), "{text}");
    assert!(!text.contains("field `"), "{text}");
}

#[test]
fn unreadable_file_is_an_io_error_naming_the_file() {
    let path = Path::new("tests/fixtures/config/does-not-exist.toml");
    let err = config::load(path).expect_err("file is missing");
    assert!(matches!(&err, ConfigError::Io { file, .. } if file == path));
    assert!(
        err.to_string()
            .starts_with("tests/fixtures/config/does-not-exist.toml: cannot read job file: "),
        "{err}"
    );
}

#[test]
fn unknown_boundary_code_lists_the_known_ones() {
    assert_error(
        "unknown_quant",
        9,
        9,
        Some("pipeline.compression.quant"),
        "int8",
    );
}

#[test]
fn a_bottleneck_wider_than_the_model_is_refused() {
    assert_error(
        "bottleneck_too_wide",
        12,
        14,
        Some("pipeline.compression.bottleneck"),
        "not in 1..=64",
    );
}

#[test]
fn a_cheat_probability_outside_0_to_1_is_refused() {
    assert_error(
        "cheat_probability",
        14,
        15,
        Some("faults.cheat[0].probability"),
        "not in 0..=1",
    );
}

#[test]
fn a_slow_factor_below_1_is_refused() {
    assert_error(
        "slow_factor",
        13,
        10,
        Some("faults.slow[0].factor"),
        "0.5 is not a finite factor of at least 1",
    );
}

#[test]
fn an_unknown_pass_clock_is_refused_and_the_known_ones_named() {
    assert_error(
        "unknown_clock",
        12,
        9,
        Some("faults.clock"),
        "unknown variant `cpu`, expected `wall` or `model`",
    );
}

#[test]
fn a_site_serving_a_stage_the_pipeline_lacks_is_refused() {
    assert_error(
        "site_stage_out_of_range",
        13,
        10,
        Some("site[0].stages"),
        "stage 2 does not exist: the pipeline has stages 0..2",
    );
}

#[test]
fn a_lone_colluder_is_refused() {
    assert_error(
        "lone_colluder",
        13,
        8,
        Some("faults.cheat[0].kind"),
        "at least two colluding ranks",
    );
}

/// Fixture, line, column, field and a fragment of the message, for
/// fixtures that need no more than [`assert_error`].
const EXPECTED: &[(&str, usize, usize, &str, &str)] = &[
    (
        "windows_zero",
        12,
        11,
        "train.windows",
        "must be at least 1",
    ),
    (
        "eval_every_zero",
        12,
        14,
        "train.eval_every",
        "must be at least 1",
    ),
    (
        "negative_lr",
        12,
        6,
        "train.lr",
        "-0.0003 is not a non-negative number",
    ),
    ("lanes_zero", 12, 9, "network.lanes", "0 is not in 1..=64"),
    (
        "replay_rate_above_one",
        13,
        15,
        "roles.replay_rate",
        "1.5 is not in 0..=1",
    ),
    (
        "slice_copies_zero",
        12,
        16,
        "roles.slice_copies",
        "must be at least 1",
    ),
    (
        "contribution_chunks_zero",
        12,
        23,
        "roles.contribution_chunks",
        "must be at least 1",
    ),
    ("standby_two", 12, 11, "roles.standby", "at most 1"),
    (
        "crash_exit_zero",
        13,
        13,
        "faults.crash[0].exit_code",
        "0 is not an exit status in 1..=255",
    ),
    (
        "crash_window_and_after",
        15,
        10,
        "faults.crash[0].window",
        "give either `window` or `after_s`, not both",
    ),
    (
        "crash_window_in_hello",
        14,
        10,
        "faults.crash[0].window",
        "only a training job (`task = \"train\"`) has windows",
    ),
    (
        "cheat_in_hello",
        13,
        8,
        "faults.cheat[0].kind",
        "only a training job (`task = \"train\"`) has miners to cheat",
    ),
    (
        "unknown_cheat_kind",
        13,
        8,
        "faults.cheat[0].kind",
        "unknown variant `steal_weights`, expected one of `random_grad`",
    ),
    (
        "two_cheats_for_one_rank",
        16,
        8,
        "faults.cheat[1].rank",
        "rank 2 already cheats in faults.cheat[0]",
    ),
    (
        "two_slowdowns_for_one_rank",
        16,
        8,
        "faults.slow[1].rank",
        "rank 3 is already slowed by faults.slow[0]",
    ),
    (
        "max_message_below_max_frame",
        12,
        15,
        "network.max_message",
        "65536 bytes is less than network.max_frame (1048576 bytes)",
    ),
    (
        "metrics_listen_without_port",
        12,
        10,
        "metrics.listen",
        "\"localhost\" is not an address and port such as \"127.0.0.1:9464\"",
    ),
    (
        "two_hangs_for_one_rank",
        16,
        8,
        "faults.hang[1].rank",
        "rank 3 already hangs in faults.hang[0]",
    ),
    (
        "hang_in_a_job_without_windows",
        13,
        10,
        "faults.hang[0].window",
        "only a training job (`task = \"train\"`) has windows",
    ),
    (
        "hold_without_condition",
        11,
        1,
        "faults.hold[0]",
        "hold until `joined = N` ranks joined, or until they `left = true`",
    ),
    (
        "unknown_hold_phase",
        14,
        9,
        "faults.hold[0].phase",
        "unknown variant `middle`, expected `start` or `close`",
    ),
    (
        "more_stages_than_layers",
        10,
        10,
        "pipeline.stages",
        "3 stages cannot share n_layer = 2 blocks",
    ),
    (
        "stage_without_blocks",
        11,
        14,
        "pipeline.layers[1]",
        "every stage needs at least one block",
    ),
    (
        "microbatch_size_zero",
        7,
        19,
        "pipeline.microbatch_size",
        "must be at least 1",
    ),
    (
        "shm_chunk_unaligned",
        13,
        13,
        "network.shm_chunk",
        "5000 bytes is not a positive multiple of 4 KiB",
    ),
    (
        "zero_connect_timeout",
        12,
        21,
        "network.connect_timeout_s",
        "0 is not a positive number of seconds",
    ),
    ("dropout_one", 7, 11, "model.dropout", "1 is not in [0, 1)"),
    (
        "bench_sizes_reversed",
        12,
        13,
        "bench.min_bytes",
        "1048576 is not in 1..=max_bytes (4096)",
    ),
    (
        "site_name_with_slash",
        7,
        8,
        "site[0].name",
        "'/' is not allowed",
    ),
    (
        "empty_hostlist",
        8,
        9,
        "site[0].hosts",
        "bad hostlist: empty hostlist",
    ),
    (
        "rendezvous_port_too_big",
        12,
        14,
        "network.rendezvous",
        "port is not a number in 0..=65535",
    ),
];

#[test]
fn each_listed_fixture_names_its_line_column_field_and_fault() {
    for &(name, line, column, field, fragment) in EXPECTED {
        assert_error(name, line, column, Some(field), fragment);
    }
}
