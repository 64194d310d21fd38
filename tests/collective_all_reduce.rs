//! All-reduce family on in-process worlds: results against a plain
//! reduction, determinism, weighted parts, the redundant and hierarchical
//! variants.

use std::fmt::Debug;

use half::{bf16, f16};
use swarmrun::collective::{
    all_reduce, all_reduce_into, all_reduce_partitioned, all_reduce_redundant,
    all_reduce_redundant_checked, all_reduce_redundant_moved, hierarchical_all_reduce,
    hierarchical_all_reduce_redundant_checked, AllReduceAlgorithm, Call, CollectiveError, Element,
    Handing, OverTransport, Partition, ReduceOp, Signing, SliceCopies, SliceTamper, Tampers,
    CHUNK_BYTES,
};
use swarmrun::signing::SigningKey;
use swarmrun::transport::{LocalTransport, Transport};

const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];

/// Element types built from small integers, so that sums over nine ranks
/// are exact even in bf16 and results can be compared with `==`.
trait Exact: Element + PartialEq + Debug {
    fn from_i32(v: i32) -> Self;
    /// What `Avg` must give for an exact sum over `n` ranks.
    fn average(sum: i32, n: usize) -> Self;
}

impl Exact for f32 {
    fn from_i32(v: i32) -> Self {
        v as f32
    }
    fn average(sum: i32, n: usize) -> Self {
        sum as f32 / n as f32
    }
}

impl Exact for i32 {
    fn from_i32(v: i32) -> Self {
        v
    }
    fn average(sum: i32, n: usize) -> Self {
        sum / n as i32
    }
}

impl Exact for bf16 {
    fn from_i32(v: i32) -> Self {
        bf16::from_f32(v as f32)
    }
    fn average(sum: i32, n: usize) -> Self {
        bf16::from_f32(sum as f32 / n as f32)
    }
}

impl Exact for f16 {
    fn from_i32(v: i32) -> Self {
        f16::from_f32(v as f32)
    }
    fn average(sum: i32, n: usize) -> Self {
        f16::from_f32(sum as f32 / n as f32)
    }
}

/// Rank `rank`'s value at index `i`: in -10..=10, so |any partial sum| ≤ 90.
fn value(rank: usize, i: usize) -> i32 {
    ((rank * 7 + i * 13) % 21) as i32 - 10
}

fn input<E: Exact>(rank: usize, len: usize) -> Vec<E> {
    (0..len).map(|i| E::from_i32(value(rank, i))).collect()
}

/// The reduction of `ranks`' inputs, computed the obvious way.
fn plain<E: Exact>(ranks: &[usize], len: usize, op: ReduceOp) -> Vec<E> {
    (0..len)
        .map(|i| {
            let values = ranks.iter().map(|&r| value(r, i));
            match op {
                ReduceOp::Sum => E::from_i32(values.sum()),
                ReduceOp::Avg => E::average(values.sum(), ranks.len()),
                ReduceOp::Max => E::from_i32(values.max().unwrap_or_default()),
            }
        })
        .collect()
}

/// Runs one all-reduce of the test inputs on a world of `n` and returns every rank's buffer.
fn reduce_world<E: Exact>(
    n: usize,
    len: usize,
    op: ReduceOp,
    algorithm: AllReduceAlgorithm,
) -> Vec<Vec<E>> {
    LocalTransport::run(LocalTransport::world(n), |t| {
        let mut buf = input::<E>(t.rank(), len);
        all_reduce(Call::new(&t, 1), &mut buf, op, algorithm).unwrap();
        buf
    })
}

fn check<E: Exact>(n: usize, len: usize, op: ReduceOp, algorithm: AllReduceAlgorithm) {
    let want = plain::<E>(&(0..n).collect::<Vec<_>>(), len, op);
    for (rank, got) in reduce_world::<E>(n, len, op, algorithm).iter().enumerate() {
        assert!(
            *got == want,
            "{} n={n} len={len} {op:?} {algorithm:?}: rank {rank} differs",
            std::any::type_name::<E>()
        );
    }
}

#[test]
fn all_reduce_equals_a_plain_reduction_for_every_size_length_type_op_and_algorithm() {
    for n in 1..=9 {
        for len in [0, 1, 1009] {
            for algorithm in AllReduceAlgorithm::CHOSEN {
                for op in OPS {
                    check::<f32>(n, len, op, algorithm);
                    check::<bf16>(n, len, op, algorithm);
                    check::<f16>(n, len, op, algorithm);
                    check::<i32>(n, len, op, algorithm);
                }
            }
        }
    }
}

#[test]
fn all_reduce_of_megabytes_crosses_chunks_and_stays_exact() {
    // 3 MiB of f32 plus a ragged tail: several chunks per step.
    let len = 3 * (1 << 20) / 4 + 3;
    for n in [5, 8] {
        for algorithm in AllReduceAlgorithm::CHOSEN {
            check::<f32>(n, len, ReduceOp::Sum, algorithm);
        }
    }
    check::<bf16>(3, len, ReduceOp::Max, AllReduceAlgorithm::Auto);
}

/// Non-integer values in [-1, 1) from a hash of (rank, index): sums round.
fn noise(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let mut x = (rank as u64) << 32 | i as u64;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

#[test]
fn rounded_results_are_bit_identical_on_every_rank_and_across_runs() {
    let len = CHUNK_BYTES / 4 * 2 + 17;
    for n in [3, 6, 8] {
        for algorithm in AllReduceAlgorithm::CHOSEN {
            let run = || {
                LocalTransport::run(LocalTransport::world(n), |t| {
                    let mut buf = noise(t.rank(), len);
                    all_reduce(Call::new(&t, 1), &mut buf, ReduceOp::Avg, algorithm).unwrap();
                    buf.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
                })
            };
            let first = run();
            assert!(
                first.iter().all(|b| *b == first[0]),
                "n={n} {algorithm:?}: ranks differ"
            );
            assert_eq!(first, run(), "n={n} {algorithm:?}: runs differ");
            // The values really were rounded: the check above is not trivial.
            assert!(first[0].iter().any(|&b| f32::from_bits(b).fract() != 0.0));
        }
    }
}

#[test]
fn out_of_place_results_are_the_in_place_bits_and_leave_the_input_alone() {
    // Two chunks and a bit, so every algorithm's first step (sent from the
    // input) and its later ones (from the output) each cross frames; rounded
    // values, so a different order of additions would show.
    let len = CHUNK_BYTES / 4 * 2 + 17;
    for n in 1..=5 {
        for algorithm in AllReduceAlgorithm::CHOSEN {
            for op in OPS {
                let pairs = LocalTransport::run(LocalTransport::world(n), |t| {
                    let input = noise(t.rank(), len);
                    let mut in_place = input.clone();
                    all_reduce(Call::new(&t, 1), &mut in_place, op, algorithm).unwrap();
                    let mut out = vec![f32::NAN; len];
                    all_reduce_into(Call::new(&t, 2), &input, &mut out, op, algorithm).unwrap();
                    assert_eq!(input, noise(t.rank(), len), "the input changed");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    (bits(&in_place), bits(&out))
                });
                for (in_place, out) in pairs {
                    assert!(in_place == out, "n={n} {algorithm:?} {op:?}");
                }
            }
        }
    }
}

#[test]
fn weighted_partitions_give_the_same_result_as_equal_ones() {
    let len = 1009;
    for n in 1..=9 {
        let weights: Vec<f64> = (0..n).map(|r| (r % 3 + 1) as f64).collect();
        let part = Partition::weighted(len, &weights).unwrap();
        let want = plain::<f32>(&(0..n).collect::<Vec<_>>(), len, ReduceOp::Sum);
        for algorithm in AllReduceAlgorithm::CHOSEN {
            let got = LocalTransport::run(LocalTransport::world(n), |t| {
                let mut buf = input::<f32>(t.rank(), len);
                all_reduce_partitioned(Call::new(&t, 1), &mut buf, ReduceOp::Sum, algorithm, &part)
                    .unwrap();
                buf
            });
            assert!(got.iter().all(|b| *b == want), "n={n} {algorithm:?}");
        }
    }
}

#[test]
fn hierarchical_all_reduce_equals_the_flat_one() {
    let len = 1009;
    for n in 2..=9 {
        let layouts: [Vec<usize>; 2] = [
            (0..n).map(|r| usize::from(r >= n / 3)).collect(),
            (0..n).map(|r| r % 2).collect(),
        ];
        for sites in &layouts {
            for op in OPS {
                let flat = reduce_world::<f32>(n, len, op, AllReduceAlgorithm::Auto);
                let hier = LocalTransport::run(LocalTransport::world(n), |t| {
                    let mut buf = input::<f32>(t.rank(), len);
                    hierarchical_all_reduce(Call::new(&t, 1), &mut buf, op, sites).unwrap();
                    buf
                });
                assert_eq!(hier, flat, "n={n} sites={sites:?} {op:?}");
            }
        }
    }
}

/// Runs a redundant all-reduce where rank `liar` (if any) adds one to its copy of `slice`.
fn redundant_world(
    n: usize,
    copies: usize,
    liar: Option<(usize, usize)>,
) -> Vec<Result<Vec<i32>, CollectiveError>> {
    let len = 101;
    LocalTransport::run(LocalTransport::world(n), |t| {
        let mut buf = input::<i32>(t.rank(), len);
        let tamper = |slice: usize, data: &mut [i32]| {
            if liar.is_some_and(|(_, s)| s == slice) {
                data[0] += 1;
            }
        };
        let hook: Option<&SliceTamper<i32>> = match liar {
            Some((rank, _)) if rank == t.rank() => Some(&tamper),
            _ => None,
        };
        all_reduce_redundant(Call::new(&t, 1), &mut buf, ReduceOp::Sum, copies, hook).map(|()| buf)
    })
}

#[test]
fn redundant_all_reduce_without_faults_equals_a_plain_reduction() {
    for n in 1..=7 {
        for copies in 1..=n.min(3) {
            let want = plain::<i32>(&(0..n).collect::<Vec<_>>(), 101, ReduceOp::Sum);
            for got in redundant_world(n, copies, None) {
                assert_eq!(got.unwrap(), want, "n={n} copies={copies}");
            }
        }
    }
}

#[test]
fn a_tampered_slice_copy_is_reported_with_its_slice_and_rank_on_every_rank() {
    // With 3 copies slice 1 is held by ranks 1, 2, 3; rank 2's copy is the odd one out,
    // then the owner's.
    for liar in [2, 1] {
        for got in redundant_world(5, 3, Some((liar, 1))) {
            match got {
                Err(CollectiveError::SliceMismatch { slice: 1, ranks }) => {
                    assert_eq!(ranks, [liar])
                }
                other => panic!("liar {liar}: expected a mismatch in slice 1, got {other:?}"),
            }
        }
    }
}

#[test]
fn a_mismatch_without_majority_names_every_holder() {
    for got in redundant_world(4, 2, Some((3, 3))) {
        match got {
            Err(CollectiveError::SliceMismatch { slice: 3, ranks }) => assert_eq!(ranks, [0, 3]),
            other => panic!("expected a mismatch in slice 3, got {other:?}"),
        }
    }
}

#[test]
fn holders_agreeing_on_a_wrong_copy_pass_the_vote_but_their_stated_digests_betray_them() {
    // Ranks 1 and 2 alone hold slice 1 with 2 copies of 4, and both add one.
    let (n, len) = (4, 101);
    let results = LocalTransport::run(LocalTransport::world(n), |t| {
        let mut buf = input::<i32>(t.rank(), len);
        let tamper = |slice: usize, data: &mut [i32]| {
            if slice == 1 {
                data[0] += 1;
            }
        };
        let hook: Option<&SliceTamper<i32>> = [1, 2].contains(&t.rank()).then_some(&tamper);
        let copies =
            all_reduce_redundant_checked(Call::new(&t, 1), &mut buf, ReduceOp::Sum, 2, hook)
                .unwrap();
        (buf, copies)
    });
    let honest = plain::<i32>(&[0, 1, 2, 3], len, ReduceOp::Sum);
    let part = Partition::equal(len, n);
    let digest = |j: usize| blake3::hash(bytemuck::cast_slice(&honest[part.range(j)]));
    for (rank, (buf, copies)) in results.iter().enumerate() {
        assert_eq!(copies.mismatch, None, "rank {rank}");
        assert_eq!(buf[part.range(1)][0], honest[part.range(1)][0] + 1);
        assert_eq!(buf[part.range(0)], honest[part.range(0)]);
        // Rank r holds slices r - 1 and r.
        let held: Vec<usize> = copies.held.iter().map(|(j, _)| *j).collect();
        let mut want = vec![(rank + n - 1) % n, rank];
        want.sort_unstable();
        assert_eq!(held, want);
        for (j, d) in &copies.held {
            assert_eq!(*d == digest(*j), *j != 1, "rank {rank} slice {j}");
        }
    }
}

#[test]
fn a_checked_mismatch_leaves_the_contribution_and_names_the_dissenters() {
    let (n, len) = (3, 50);
    let results = LocalTransport::run(LocalTransport::world(n), |t| {
        let mut buf = input::<i32>(t.rank(), len);
        let tamper = |_: usize, data: &mut [i32]| data[0] += 1;
        let hook: Option<&SliceTamper<i32>> = (t.rank() == 2).then_some(&tamper);
        let copies =
            all_reduce_redundant_checked(Call::new(&t, 1), &mut buf, ReduceOp::Sum, 3, hook)
                .unwrap();
        (buf, copies.mismatch)
    });
    for (rank, (buf, mismatch)) in results.into_iter().enumerate() {
        assert_eq!(mismatch, Some((0, vec![2])), "rank {rank}");
        assert_eq!(buf, input::<i32>(rank, len), "rank {rank}");
    }
}

/// A redundant all-reduce of 4 ranks where rank `forger` (if any) adds one
/// to the slice it hands out (after signing the agreed one when `denied`),
/// signing every statement when `signed`, with rank 1's key known to the
/// others when `known`. Returns each rank's outcome and every rank's
/// public key.
#[allow(clippy::type_complexity)]
fn hand_out(
    forger: Option<(usize, bool)>,
    signed: bool,
    known: bool,
) -> (
    Vec<Result<(Vec<i32>, SliceCopies), CollectiveError>>,
    Vec<String>,
) {
    let keys: Vec<SigningKey> = (0..4).map(|_| SigningKey::generate().unwrap()).collect();
    let public: Vec<String> = keys.iter().map(|k| k.public_hex()).collect();
    let told: Vec<Option<String>> = public
        .iter()
        .enumerate()
        .map(|(r, k)| (r != 1 || known).then(|| k.clone()))
        .collect();
    let results = LocalTransport::run(LocalTransport::world(4), |t| {
        let mut buf = input::<i32>(t.rank(), 101);
        let forge = |_: usize, data: &mut [i32]| data[0] += 1;
        let handing = Handing {
            signing: signed.then(|| Signing {
                own: &keys[t.rank()],
                keys: &told,
            }),
            tamper: (forger == Some((t.rank(), false))).then_some(&forge as &SliceTamper<i32>),
            deniable: (forger == Some((t.rank(), true))).then_some(&forge as &SliceTamper<i32>),
        };
        let copies = all_reduce_redundant_moved(
            Call::new(&t, 1),
            &mut buf,
            (ReduceOp::Sum, 2),
            None,
            handing,
            &mut OverTransport,
        )?;
        Ok((buf, copies))
    });
    (results, public)
}

#[test]
fn a_slice_handed_out_other_than_agreed_is_proved_by_its_owner_s_signed_statement() {
    let honest = plain::<i32>(&[0, 1, 2, 3], 101, ReduceOp::Sum);
    // Without a forger nobody holds a proof, and the result is the sum.
    for result in hand_out(None, true, true).0 {
        let (buf, copies) = result.unwrap();
        assert!(copies.holds_result());
        assert_eq!(buf, honest);
    }
    let (results, keys) = hand_out(Some((1, false)), true, true);
    let part = Partition::equal(101, 4);
    let agreed = blake3::hash(bytemuck::cast_slice(&honest[part.range(1)]))
        .to_hex()
        .to_string();
    for (rank, result) in results.iter().enumerate() {
        let (buf, copies) = result.as_ref().unwrap();
        assert_eq!(copies.mismatch, None, "rank {rank}: the copies agreed");
        if rank == 1 {
            assert!(copies.wrong.is_empty() && copies.holds_result());
            continue;
        }
        assert!(!copies.holds_result(), "rank {rank}");
        assert_eq!(buf[part.range(1)][0], honest[part.range(1)][0] + 1);
        assert_eq!(buf[part.range(2)], honest[part.range(2)], "rank {rank}");
        let [proof] = &copies.wrong[..] else {
            panic!("rank {rank}: {copies:?}")
        };
        assert_eq!(proof.slice, 1);
        // Anyone with rank 1's key can check it; it holds for nothing else.
        assert!(proof.proves(&keys[1], 1, &agreed), "rank {rank}");
        assert!(!proof.proves(&keys[0], 1, &agreed), "another key");
        assert!(!proof.proves(&keys[1], 2, &agreed), "another call");
        assert!(!proof.proves(&keys[1], 1, &proof.digest), "no difference");
    }
}

#[test]
fn a_wrong_slice_its_owner_did_not_sign_for_ends_the_call_naming_the_owner() {
    // Unsigned, signed with a key the others do not know, or a signature
    // of the agreed copy over other bytes: one rank's word against
    // another's, so the call fails and names the owner.
    for (denied, signed, known) in [
        (false, false, false),
        (false, true, false),
        (true, true, true),
    ] {
        let (results, _) = hand_out(Some((1, denied)), signed, known);
        for (rank, result) in results.into_iter().enumerate() {
            match result {
                Err(CollectiveError::UnprovedSlice { rank: 1, slice: 1 }) if rank != 1 => {}
                Ok((_, copies)) if rank == 1 => assert!(copies.wrong.is_empty()),
                other => panic!("signed {signed}, rank {rank}: {other:?}"),
            }
        }
    }
}

#[test]
fn hierarchical_redundant_all_reduce_over_two_or_three_sites_has_the_flat_one_s_bits() {
    let len = 1009;
    for n in 2..=8 {
        let layouts: [Vec<usize>; 3] = [
            (0..n).map(|r| usize::from(r >= n / 2)).collect(),
            (0..n).map(|r| r % 3).collect(),
            (0..n).map(|r| [2, 0, 1][r % 3]).collect(),
        ];
        // Integers near the top of their range, so that wrapping order
        // would show if it mattered.
        let value =
            |rank: usize, i: usize| ((rank as i64 + 1) * (i64::MAX / 9)).wrapping_add(i as i64);
        let flat = LocalTransport::run(LocalTransport::world(n), |t| {
            let mut buf: Vec<i64> = (0..len).map(|i| value(t.rank(), i)).collect();
            all_reduce_redundant_checked(Call::new(&t, 1), &mut buf, ReduceOp::Sum, 2, None)
                .unwrap();
            buf
        });
        for sites in &layouts {
            let hier = LocalTransport::run(LocalTransport::world(n), |t| {
                let mut buf: Vec<i64> = (0..len).map(|i| value(t.rank(), i)).collect();
                let copies = hierarchical_all_reduce_redundant_checked(
                    Call::new(&t, 8),
                    &mut buf,
                    ReduceOp::Sum,
                    2,
                    sites,
                    Tampers::default(),
                )
                .unwrap();
                assert!(copies.agreed);
                // Leaders are the lowest rank of each site; only they
                // reduce between sites, with their site's partial sum.
                let leader = (0..n).find(|&r| sites[r] == sites[t.rank()]) == Some(t.rank());
                assert_eq!(copies.leader.is_some(), leader, "rank {}", t.rank());
                if let Some((partial, _)) = &copies.leader {
                    let mine = (0..n).filter(|&r| sites[r] == sites[t.rank()]);
                    let want: Vec<i64> = (0..len)
                        .map(|i| mine.clone().fold(0i64, |a, r| a.wrapping_add(value(r, i))))
                        .collect();
                    assert_eq!(*partial, want);
                }
                buf
            });
            assert_eq!(hier, flat, "n={n} sites={sites:?}");
        }
    }
}

#[test]
fn a_tampered_copy_in_one_site_is_seen_in_every_site() {
    let (n, len) = (6, 101);
    let sites = [0, 0, 0, 1, 1, 1];
    let results = LocalTransport::run(LocalTransport::world(n), |t| {
        let mut buf: Vec<i64> = (0..len as i64).map(|i| i * (t.rank() as i64 + 1)).collect();
        let tamper = |_: usize, data: &mut [i64]| data[0] += 1;
        let hook: Option<&SliceTamper<i64>> = (t.rank() == 4).then_some(&tamper);
        hierarchical_all_reduce_redundant_checked(
            Call::new(&t, 8),
            &mut buf,
            ReduceOp::Sum,
            2,
            &sites,
            Tampers {
                slices: hook,
                partial: None,
            },
        )
        .unwrap()
    });
    for (rank, copies) in results.iter().enumerate() {
        assert!(!copies.agreed, "rank {rank} believes a result");
        let in_site_1 = sites[rank] == 1;
        assert_eq!(copies.site.mismatch.is_some(), in_site_1, "rank {rank}");
        if let Some((_, ranks)) = &copies.site.mismatch {
            // Rank 4 is rank 1 of its site: outer ranks are named.
            assert!(ranks.contains(&4), "{ranks:?}");
        }
    }
}
