//! Formation: ranks started by hand (`swarmrun rank` with RANK and
//! WORLD_SIZE, as under mpirun or srun), all at once or in a random order,
//! always form one world. `launch/formation.sh` runs the trials; the full
//! 100 + 100 of the note run with `--trials 100`.

use std::process::Command;

fn trials(spread: &str) -> String {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/launch/formation.sh"))
        .args(["--trials", "3", "--spread", spread])
        .args(["--bin", env!("CARGO_BIN_EXE_swarmrun")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn ranks_started_all_at_once_form_one_world_every_time() {
    let text = trials("0");
    assert!(text.contains("3 of 3 trials formed one world"), "{text}");
}

#[test]
fn ranks_started_in_a_random_order_form_one_world_every_time() {
    let text = trials("2");
    assert!(
        text.contains("3 of 3 trials formed one world (spread 2 s"),
        "{text}"
    );
}
