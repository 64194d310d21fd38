//! Ranks of two builds that would misread each other's orders and reports
//! must be refused at the handshake, which compares [`wire::VERSION`]. So
//! every change to the shape of what roles say to each other
//! (`roles::protocol`: field and variant names and types) must come with a
//! bump of that version; this test holds the shape to the version, so the
//! bump cannot be forgotten (last it was: `AuditTask::weights_held`).

use serde_reflection::{Registry, Samples, Tracer, TracerConfig};
use swarmrun::roles::protocol::{Handover, Order, PassSketch, Report, StageDigests, Verdict};
use swarmrun::wire;

/// The wire version and the digest of the messages' shape at that version.
const PINNED: (u8, &str) = (
    5,
    "17bc665a46646546dcdb5ae37498fd55a817587a871c49679d95c293213843be",
);

/// The serde shape of every message roles send each other, and of every
/// type inside them.
fn shape() -> Registry {
    let mut tracer = Tracer::new(TracerConfig::default());
    let samples = Samples::new();
    // Enums inside the messages, each traced whole on its own first.
    tracer.trace_simple_type::<Verdict>().unwrap();
    tracer
        .trace_simple_type::<Result<StageDigests, String>>()
        .unwrap();
    tracer.trace_type::<Order>(&samples).unwrap();
    tracer.trace_type::<Report>(&samples).unwrap();
    tracer.trace_type::<Handover>(&samples).unwrap();
    tracer.trace_type::<PassSketch>(&samples).unwrap();
    tracer.registry().unwrap()
}

#[test]
fn the_shape_of_what_roles_say_changes_only_with_the_wire_version() {
    let json = serde_json::to_vec(&shape()).unwrap();
    let digest = blake3::hash(&json).to_hex().to_string();
    let version = match digest == PINNED.1 {
        true => wire::VERSION,
        false => wire::VERSION.max(PINNED.0 + 1),
    };
    assert_eq!(
        (wire::VERSION, digest.as_str()),
        PINNED,
        "roles::protocol's messages or wire::VERSION are not as pinned: a \
         change of the messages' shape needs a bump of wire::VERSION \
         (src/wire/frame.rs, with a word on why), then pin ({version}, \
         \"{digest}\") here",
    );
}
