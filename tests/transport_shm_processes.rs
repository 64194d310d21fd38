//! Shared-memory transport with ranks as real processes.
//!
//! Each test re-runs this test binary as its ranks: the child is started with
//! `--exact rank_process` and an environment variable saying which scenario,
//! rank, size and segment to play, so only [`rank_process`] runs in it.

use std::env;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use swarmrun::transport::shm::{ShmOptions, ShmTransport};
use swarmrun::transport::{Transport, TransportError};

const ROLE: &str = "SWARMRUN_SHM_TEST_ROLE";

fn segment_name(test: &str) -> String {
    format!("swarmrun-ptest-{}-{test}", std::process::id())
}

fn spawn_rank(scenario: &str, rank: usize, size: usize, segment: &str) -> Child {
    Command::new(env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "rank_process",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env(ROLE, format!("{scenario}:{rank}:{size}:{segment}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn rank process")
}

/// Waits for a rank process; returns the lines it printed, failing the test
/// if it failed.
fn finish(child: Child, what: &str) -> Vec<String> {
    let out = child.wait_with_output().expect("wait for rank process");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}",
        out.status
    );
    stdout.lines().map(str::to_owned).collect()
}

/// Reads `child`'s stdout until a line equal to `line`.
fn wait_for_line(child: &mut Child, line: &str) {
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut reader = BufReader::new(stdout);
    let mut got = String::new();
    loop {
        got.clear();
        let n = reader.read_line(&mut got).expect("read child stdout");
        assert!(n > 0, "child ended before printing {line:?}");
        if got.trim_end() == line {
            return;
        }
    }
}

fn run_group(scenario: &str, size: usize, test: &str) -> Vec<Vec<String>> {
    let segment = segment_name(test);
    let children: Vec<_> = (0..size)
        .map(|rank| spawn_rank(scenario, rank, size, &segment))
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(rank, child)| finish(child, &format!("rank {rank} of {scenario}")))
        .collect()
}

fn test_opts() -> ShmOptions {
    ShmOptions {
        ring_capacity: 4096,
        chunk_bytes: 256 << 10,
        timeout: Duration::from_secs(30),
        join_timeout: Duration::from_secs(30),
        ..ShmOptions::default()
    }
}

fn sum_f32(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
        let v =
            f32::from_ne_bytes(d.try_into().unwrap()) + f32::from_ne_bytes(s.try_into().unwrap());
        d.copy_from_slice(&v.to_ne_bytes());
    }
}

/// Inputs whose sum depends on the order of addition (mixed magnitudes), so
/// that comparing with a rank-order sum is a real check.
fn reduce_input(rank: usize, i: usize) -> f32 {
    let x = (i as u32)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(rank as u32 * 40_503);
    let mantissa = (x % 10_000) as f32 / 7.0;
    let scale = [1e-3, 1.0, 1e3, 1e6][(x as usize >> 16) % 4];
    mantissa * scale * if x & 1 == 0 { 1.0 } else { -1.0 }
}

fn to_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_ne_bytes).collect()
}

/// Entry point of the rank processes; does nothing in a normal test run.
#[test]
fn rank_process() {
    let Ok(role) = env::var(ROLE) else {
        return;
    };
    let mut fields = role.splitn(4, ':');
    let scenario = fields.next().unwrap().to_owned();
    let rank: usize = fields.next().unwrap().parse().unwrap();
    let size: usize = fields.next().unwrap().parse().unwrap();
    let segment = fields.next().unwrap().to_owned();
    match scenario.as_str() {
        "exchange" => exchange(&segment, rank, size),
        "reduce" => reduce(&segment, rank, size),
        "doomed" => doomed(&segment, rank, size),
        "recv-from-doomed" => recv_from_doomed(&segment, rank, size),
        "reduce-with-doomed" => reduce_with_doomed(&segment, rank, size),
        "crash-holder" => crash_holder(&segment),
        "bench" => bench(&segment, rank, size),
        other => panic!("unknown scenario {other}"),
    }
}

const TAGS: [u64; 3] = [1, 0xbeef, u64::MAX - 1];
const PER_TAG: u32 = 20;

fn big_message(from: usize, to: usize) -> Vec<u8> {
    (0..10 * test_opts().ring_capacity)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add((from * 7 + to) as u32) as u8
        })
        .collect()
}

fn exchange(segment: &str, rank: usize, size: usize) {
    let t = ShmTransport::open(segment, rank, size, test_opts()).unwrap();
    // Everyone sends everything to everyone (itself included) before
    // receiving anything: interleaved tags, then a message ten rings long.
    for seq in 0..PER_TAG {
        for tag in TAGS {
            for to in 0..size {
                t.send(to, tag, format!("{rank}->{to} tag {tag} #{seq}").as_bytes())
                    .unwrap();
            }
        }
    }
    for to in 0..size {
        t.send(to, 77, &big_message(rank, to)).unwrap();
    }
    // Receive in another order than sent: big message first, tags reversed.
    for from in 0..size {
        assert_eq!(
            t.recv(from, 77).unwrap(),
            big_message(from, rank),
            "big from {from}"
        );
        for tag in TAGS.iter().rev() {
            for seq in 0..PER_TAG {
                let got = String::from_utf8(t.recv(from, *tag).unwrap()).unwrap();
                assert_eq!(got, format!("{from}->{rank} tag {tag} #{seq}"));
            }
        }
    }
    t.barrier().unwrap();
}

#[test]
fn four_processes_exchange_tagged_messages_in_order_including_ten_rings_long() {
    run_group("exchange", 4, "exchange");
}

const REDUCE_LENGTHS: [usize; 4] = [0, 1, 1009, (3 << 20) / 4];

fn reduce(segment: &str, rank: usize, size: usize) {
    let t = ShmTransport::open(segment, rank, size, test_opts()).unwrap();
    for n in REDUCE_LENGTHS {
        let mut buf = to_bytes((0..n).map(|i| reduce_input(rank, i)));
        t.all_reduce_bytes(&mut buf, 4, &sum_f32).unwrap();
        let expected = to_bytes(
            (0..n).map(|i| (1..size).fold(reduce_input(0, i), |acc, r| acc + reduce_input(r, i))),
        );
        assert!(
            buf == expected,
            "all_reduce_bytes of {n} floats differs from the rank-order sum"
        );
        println!("all_reduce_bytes {n} {}", blake3::hash(&buf));
    }
    // The same through shared buffers, for the lengths that fit one.
    for n in REDUCE_LENGTHS
        .into_iter()
        .filter(|&n| 4 * n <= t.max_shared_len())
    {
        let mut shared = t.shared_buffer(4 * n).unwrap();
        shared
            .as_mut_slice()
            .copy_from_slice(&to_bytes((0..n).map(|i| reduce_input(rank, i))));
        let reduced = shared.all_reduce(4, &sum_f32).unwrap();
        println!("shared_buffer {n} {}", blake3::hash(&reduced));
    }
}

#[test]
fn four_processes_all_reduce_f32_sum_to_the_rank_order_sum_bit_identically() {
    let outputs = run_group("reduce", 4, "reduce");
    let results = |rank: usize| -> Vec<&String> {
        outputs[rank]
            .iter()
            .filter(|l| l.starts_with("all_reduce_bytes ") || l.starts_with("shared_buffer "))
            .collect()
    };
    assert_eq!(
        results(0).len(),
        REDUCE_LENGTHS.len() + 3,
        "{:?}",
        outputs[0]
    );
    for rank in 1..4 {
        assert_eq!(results(rank), results(0), "rank {rank} differs from rank 0");
    }
    // Shared buffers and copies give the same bytes.
    for n in [0, 1, 1009] {
        let hash = |kind: &str| {
            results(0)
                .iter()
                .find(|l| l.starts_with(&format!("{kind} {n} ")))
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(hash("all_reduce_bytes"), hash("shared_buffer"), "n = {n}");
    }
}

fn doomed(segment: &str, rank: usize, size: usize) {
    let _t = ShmTransport::open(segment, rank, size, test_opts()).unwrap();
    println!("joined");
    thread::sleep(Duration::from_secs(600));
}

fn recv_from_doomed(segment: &str, rank: usize, size: usize) {
    let t = ShmTransport::open(segment, rank, size, test_opts()).unwrap();
    println!("waiting");
    let err = t.recv(1, 5).unwrap_err();
    assert!(
        matches!(err, TransportError::PeerLost { rank: 1, .. }),
        "{err}"
    );
    println!("lost: {err}");
}

fn reduce_with_doomed(segment: &str, rank: usize, size: usize) {
    let t = ShmTransport::open(segment, rank, size, test_opts()).unwrap();
    println!("waiting");
    let mut buf = vec![0u8; 4096];
    let err = t.all_reduce_bytes(&mut buf, 4, &sum_f32).unwrap_err();
    assert!(
        matches!(err, TransportError::PeerLost { rank: 1, .. }),
        "{err}"
    );
    println!("lost: {err}");
}

/// Runs `survivor` as rank 0 and a `doomed` rank 1, kills rank 1 once rank 0
/// waits on it, and returns how long rank 0 took to report the loss. Rank 1
/// is reaped only afterwards, so it is a zombie meanwhile, as it would be
/// under a launcher that has not got round to it.
fn time_to_notice_killed_peer(survivor: &str, test: &str) -> Duration {
    let segment = segment_name(test);
    let mut doomed = spawn_rank("doomed", 1, 2, &segment);
    let mut waiting = spawn_rank(survivor, 0, 2, &segment);
    wait_for_line(&mut doomed, "joined");
    wait_for_line(&mut waiting, "waiting");
    thread::sleep(Duration::from_millis(200));
    doomed.kill().expect("kill rank 1");
    let killed = Instant::now();
    let status = waiting.wait().expect("wait for rank 0");
    let noticed = killed.elapsed();
    doomed.wait().expect("reap rank 1");
    assert!(status.success(), "rank 0 did not see PeerLost: {status}");
    noticed
}

/// Rank 0 exits successfully only on `PeerLost` (a timeout fails it);
/// that it also exits well inside its timeout shows the loss was seen,
/// not waited out, whatever the host's load.
#[test]
fn recv_from_a_killed_peer_process_gives_peer_lost_before_any_timeout() {
    let noticed = time_to_notice_killed_peer("recv-from-doomed", "killed-recv");
    assert!(noticed < test_opts().timeout / 2, "took {noticed:?}");
}

#[test]
fn all_reduce_with_a_killed_peer_process_gives_peer_lost_before_any_timeout() {
    let noticed = time_to_notice_killed_peer("reduce-with-doomed", "killed-reduce");
    assert!(noticed < test_opts().timeout / 2, "took {noticed:?}");
}

/// Opens a whole 2-rank segment (rank 1 on a thread), reports its nonce and
/// waits to be killed, leaving a complete-looking segment behind.
fn crash_holder(segment: &str) {
    let one = thread::spawn({
        let segment = segment.to_owned();
        move || ShmTransport::open(&segment, 1, 2, test_opts()).unwrap()
    });
    let zero = ShmTransport::open(segment, 0, 2, test_opts()).unwrap();
    let _one = one.join().unwrap();
    println!("nonce {}", zero.run_nonce());
    println!("joined");
    thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_segment_left_by_a_killed_run_is_replaced_not_trusted() {
    let segment = segment_name("stale-run");
    let mut holder = Command::new(env::current_exe().unwrap())
        .args([
            "--exact",
            "rank_process",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env(ROLE, format!("crash-holder:0:2:{segment}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stale_nonce = None;
    {
        let mut reader = BufReader::new(holder.stdout.as_mut().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            if let Some(nonce) = line.trim_end().strip_prefix("nonce ") {
                stale_nonce = Some(nonce.parse::<u64>().unwrap());
            }
            if line.trim_end() == "joined" {
                break;
            }
            line.clear();
        }
    }
    let stale_nonce = stale_nonce.expect("crash holder printed its nonce");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(std::path::Path::new("/dev/shm").join(&segment).exists());

    // The joiner starts first, finds the stale segment, and must wait for
    // rank 0 to replace it rather than join the dead run.
    let joiner = thread::spawn({
        let segment = segment.clone();
        move || ShmTransport::open(&segment, 1, 2, test_opts()).unwrap()
    });
    thread::sleep(Duration::from_millis(200));
    let zero = ShmTransport::open(&segment, 0, 2, test_opts()).unwrap();
    let one = joiner.join().unwrap();
    assert_ne!(zero.run_nonce(), stale_nonce);
    assert_eq!(zero.run_nonce(), one.run_nonce());
    one.send(0, 1, b"fresh").unwrap();
    assert_eq!(zero.recv(1, 1).unwrap(), b"fresh");
}

const BENCH_BYTES: usize = 64 << 20;
const BENCH_ITERS: usize = 20;

fn bench_opts(chunk_bytes: usize) -> ShmOptions {
    ShmOptions {
        chunk_bytes,
        ..ShmOptions::default()
    }
}

/// Runs `op` once to warm up, then `BENCH_ITERS` times; returns the median
/// and the best time in seconds. The machine may be shared, so the median
/// says more than the mean.
fn time_iterations(mut op: impl FnMut()) -> (f64, f64) {
    op();
    let mut times: Vec<f64> = (0..BENCH_ITERS)
        .map(|_| {
            let start = Instant::now();
            op();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[BENCH_ITERS / 2], times[0])
}

/// Times all-reduces of 64 MiB of f32; rank 0 prints busbw
/// (bytes / time * 2(n-1)/n).
fn bench(segment: &str, rank: usize, size: usize) {
    let busbw = |secs: f64| BENCH_BYTES as f64 / secs * 2.0 * (size - 1) as f64 / size as f64 / 1e9;
    let report = |what: &str, (median, best): (f64, f64)| {
        if rank == 0 {
            println!(
                "{what}: median {:.2} ms, busbw {:.2} GB/s (best {:.2} GB/s)",
                median * 1e3,
                busbw(median),
                busbw(best)
            );
        }
    };
    let chunk: usize = env::var("SWARMRUN_BENCH_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ShmOptions::default().chunk_bytes);
    let t = ShmTransport::open(&format!("{segment}-copy"), rank, size, bench_opts(chunk)).unwrap();
    let mut buf = to_bytes((0..BENCH_BYTES / 4).map(|i| reduce_input(rank, i)));
    t.barrier().unwrap();
    let times = time_iterations(|| t.all_reduce_bytes(&mut buf, 4, &sum_f32).unwrap());
    report(
        &format!(
            "all_reduce_bytes 64 MiB f32 x{size}, {} KiB chunks",
            chunk >> 10
        ),
        times,
    );
    drop(t);

    let t = ShmTransport::open(
        &format!("{segment}-shared"),
        rank,
        size,
        bench_opts(BENCH_BYTES),
    )
    .unwrap();
    let input = to_bytes((0..BENCH_BYTES / 4).map(|i| reduce_input(rank, i)));
    let reduce_shared = |write_input: bool| {
        let mut shared = t.shared_buffer(BENCH_BYTES).unwrap();
        if write_input {
            shared.as_mut_slice().copy_from_slice(&input);
        }
        let _reduced = shared.all_reduce(4, &sum_f32).unwrap();
    };
    // Fill every scratch set once; then time the reduction alone, as seen by
    // a caller that computes its input straight into the buffer.
    for _ in 0..3 {
        reduce_shared(true);
    }
    t.barrier().unwrap();
    let times = time_iterations(|| reduce_shared(false));
    report(
        &format!("shared_buffer    64 MiB f32 x{size}, in place"),
        times,
    );
    drop(t);

    // Point to point between ranks 0 and 1 while the others wait in a barrier.
    let t =
        ShmTransport::open(&format!("{segment}-p2p"), rank, size, ShmOptions::default()).unwrap();
    if rank < 2 {
        let peer = 1 - rank;
        const ROUND_TRIPS: usize = 2000;
        let start = Instant::now();
        for _ in 0..ROUND_TRIPS {
            if rank == 0 {
                t.send(peer, 1, &[0; 8]).unwrap();
                t.recv(peer, 1).unwrap();
            } else {
                let ping = t.recv(peer, 1).unwrap();
                t.send(peer, 1, &ping).unwrap();
            }
        }
        let rtt = start.elapsed().as_secs_f64() / ROUND_TRIPS as f64;
        let (median, _) = time_iterations(|| {
            if rank == 0 {
                t.send(peer, 2, &input).unwrap();
                t.recv(peer, 3).unwrap();
            } else {
                assert_eq!(t.recv(peer, 2).unwrap().len(), BENCH_BYTES);
                t.send(peer, 3, &[]).unwrap();
            }
        });
        if rank == 0 {
            println!(
                "send/recv: 8-byte round trip {:.1} us; 64 MiB message {:.2} ms, {:.2} GB/s",
                rtt * 1e6,
                median * 1e3,
                BENCH_BYTES as f64 / median / 1e9
            );
        }
    }
    t.barrier().unwrap();
}

/// Prints all_reduce_bytes busbw for 64 MiB of f32 over 4 processes, next to
/// single-thread memcpy of the same buffer. Run by hand:
/// `cargo test --release --test transport_shm_processes -- --ignored --nocapture`
/// (`SWARMRUN_BENCH_CHUNK=bytes` overrides the chunk size).
#[test]
#[ignore = "timing printout, run by hand"]
fn timing_all_reduce_64mib_f32_four_processes() {
    let src = vec![1u8; BENCH_BYTES];
    let mut dst = vec![0u8; BENCH_BYTES];
    let (median, best) = time_iterations(|| dst.copy_from_slice(std::hint::black_box(&src)));
    std::hint::black_box(&dst);
    println!(
        "memcpy 64 MiB, one thread: median {:.2} ms, {:.2} GB/s (best {:.2} GB/s)",
        median * 1e3,
        BENCH_BYTES as f64 / median / 1e9,
        BENCH_BYTES as f64 / best / 1e9
    );
    for lines in run_group("bench", 4, "bench") {
        for line in lines
            .iter()
            .filter(|l| l.contains("busbw") || l.starts_with("send/recv"))
        {
            println!("{line}");
        }
    }
}
