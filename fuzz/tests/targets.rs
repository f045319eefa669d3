//! Every fuzz target over its seed corpus and a bounded number of mutated inputs, in every `cargo test`.
//! The counts keep all targets together within seconds in a debug build; long runs are `courier-fuzz` or
//! cargo-fuzz (see the README).

use courier_fuzz::harness;

fn fuzz(target: &str, cases: u64) {
    assert!(!harness::seeds(target).is_empty(), "{target} has no seeds");
    let outcome = harness::run(target, 0x5eed, cases, None);
    if let Some(input) = outcome.crash {
        panic!("{target} panicked on {} bytes: {}", input.len(), hex::encode(&input));
    }
    assert_eq!(outcome.executions, cases);
}

#[test]
fn device_frame() {
    fuzz("device_frame", 20_000);
}

#[test]
fn apns_head() {
    fuzz("apns_head", 20_000);
}

#[test]
fn jwt() {
    fuzz("jwt", 300);
}

#[test]
fn token() {
    fuzz("token", 5_000);
}

#[test]
fn raft_command() {
    fuzz("raft_command", 3_000);
}
