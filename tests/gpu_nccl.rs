//! The stage all-reduce's slices through NCCL (`fabric = "nccl"`): the
//! same sums and the same copy digests as over TCP, one rank per GPU of
//! this machine (NCCL refuses two ranks on one GPU, so a one-GPU machine
//! checks a world of one). Without a GPU the test says so and passes.
#![cfg(feature = "cuda")]

use swarmrun::collective::{
    all_reduce_redundant_checked, all_reduce_redundant_moved, Call, Handing, ReduceOp,
};
use swarmrun::gpu::nccl::NcclMover;
use swarmrun::gpu::Gpu;
use swarmrun::transport::{LocalTransport, Transport};

#[test]
fn gpu_slices_through_nccl_give_the_sums_and_digests_of_tcp() {
    let gpus = match Gpu::count() {
        Ok(n) if n > 0 => n,
        other => {
            println!("skipped: no GPU ({other:?})");
            return;
        }
    };
    // Fixed-point values as a stage's contributions hold them, large and of
    // both signs, in a length no world size divides.
    let len = 100_003;
    let results = LocalTransport::run(LocalTransport::world(gpus), |t| {
        let rank = t.rank();
        let gpu = Gpu::new(rank).unwrap();
        let members: Vec<usize> = (0..t.size()).collect();
        let mut mover = NcclMover::connect(gpu, Call::new(&t, 1), members).unwrap();
        let values: Vec<i64> = (0..len)
            .map(|i| ((i as i64 * 7919 + rank as i64 * 104_729) % 2_000_003 - 1_000_001) << 20)
            .collect();
        let copies = t.size().min(2);
        let mut by_nccl = values.clone();
        let nccl = all_reduce_redundant_moved(
            Call::new(&t, 3),
            &mut by_nccl,
            (ReduceOp::Sum, copies),
            None,
            Handing::default(),
            &mut mover,
        )
        .unwrap();
        let mut by_tcp = values;
        let tcp = all_reduce_redundant_checked(
            Call::new(&t, 5),
            &mut by_tcp,
            ReduceOp::Sum,
            copies,
            None,
        )
        .unwrap();
        (by_nccl, nccl, by_tcp, tcp)
    });
    for (rank, (by_nccl, nccl, by_tcp, tcp)) in results.iter().enumerate() {
        assert_eq!(by_nccl, by_tcp, "rank {rank}: the sums differ");
        assert_eq!(nccl, tcp, "rank {rank}: the copies' digests differ");
        assert!(nccl.mismatch.is_none());
    }
    println!("{gpus} rank(s), one per GPU: NCCL and TCP give the same sums and digests");
}
