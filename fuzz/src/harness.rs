//! A deterministic mutation fuzzer with no coverage feedback: stable Rust, no instrumentation, the same
//! inputs on every run of one seed. It starts from a target's checked-in seed corpus and applies a few
//! random edits per input (bit flips, interesting values, insertions, deletions, duplications, splices
//! and words from the target's dictionary), with some wholly random inputs mixed in. `cargo test` runs a
//! bounded number of cases per target; the `courier-fuzz` binary runs one target for as long as asked.
//!
//! A panicking input is written to `fuzz/artifacts/<target>/` and reported with its hex, so it can be
//! replayed and then checked in as a seed (which makes it a regression test).

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Longest input the harness makes; long enough for every frame, head and command it needs to reach.
pub const MAX_INPUT: usize = 4096;

/// Where the seed corpus lives: one directory per target.
pub fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

/// The checked-in seeds of `target`, in file-name order (so runs are reproducible).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = seeds_dir().join(target);
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Words worth inserting for `target`: the tokens its parser branches on.
pub fn dictionary(target: &str) -> &'static [&'static [u8]] {
    match target {
        "apns_head" => &[
            b"\n",
            b"\n\n",
            b"POST",
            b"GET",
            b"/3/device/",
            b"apns-topic: ",
            b"apns-push-type: ",
            b"apns-priority: ",
            b"apns-expiration: ",
            b"apns-collapse-id: ",
            b"apns-id: ",
            b"authorization: bearer ",
            b"voip",
            b"background",
            b"liveactivity",
            b".voip",
            b".push-type.liveactivity",
            b".complication",
            b"10",
            b"5",
            b"18446744073709551616",
            b"6f2a8c1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
            b"{}",
            b"{\"aps\":{}}",
        ],
        "jwt" => &[
            b"Bearer ",
            b".",
            b"\0",
            b"{\"alg\":\"ES256\",\"kid\":\"KEY1234567\"}",
            b"\"alg\":\"none\"",
            b"\"iss\":\"TEAM123456\"",
            b"\"iat\":",
            b"1800000000",
            b"1.8e9",
            b"\"1800000000\"",
            b"1e999",
            b"-9223372036854775808",
            b"NaN",
            b"eyJ",
        ],
        "token" => &[b"0", b"a", b"f", b"A", b"00000001", b"00000002", b"00000003", b"ffffffff"],
        "raft_command" => &[
            b"{\"type\":\"set_ring\",\"params\":{\"vnodes\":4294967295,\"replication_factor\":1}}",
            b"\"type\":",
            b"\"put_member\"",
            b"\"put_provider_key\"",
            b"\"rotate_token_key\"",
            b"\"revoke_device\"",
            b"\"remove_provider\"",
            b"4294967295",
            b"18446744073709551615",
            b"-1",
            b"1e999",
            b"null",
            b"[]",
            b"{}",
            b"\"\"",
        ],
        _ => &[&[0x0a], &[0x12], &[0x08], &[0x80], &[0xff, 0xff, 0xff, 0xff, 0x0f], &[0, 0, 0, 0]],
    }
}

/// Values that sit on the edges of the integers parsers read.
const INTERESTING: &[&[u8]] = &[
    &[0],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x7f, 0xff, 0xff, 0xff],
    &[0, 0, 0x40, 0],
    &[0, 0, 0x40, 1],
];

/// Makes inputs for one target from its seeds.
pub struct Mutator {
    rng: StdRng,
    seeds: Vec<Vec<u8>>,
    dictionary: &'static [&'static [u8]],
}

impl Mutator {
    pub fn new(target: &str, seed: u64) -> Self {
        Mutator { rng: StdRng::seed_from_u64(seed), seeds: seeds(target), dictionary: dictionary(target) }
    }

    /// The next input: usually a seed with 1–8 edits, sometimes random bytes.
    pub fn next_input(&mut self) -> Vec<u8> {
        if self.seeds.is_empty() || self.rng.random_ratio(1, 16) {
            let len = self.rng.random_range(0..256);
            return (0..len).map(|_| self.rng.random()).collect();
        }
        let mut input = self.seeds[self.rng.random_range(0..self.seeds.len())].clone();
        for _ in 0..self.rng.random_range(1..=8) {
            self.edit(&mut input);
        }
        input.truncate(MAX_INPUT);
        input
    }

    fn edit(&mut self, input: &mut Vec<u8>) {
        let at = |rng: &mut StdRng, input: &Vec<u8>| rng.random_range(0..=input.len());
        match self.rng.random_range(0..9) {
            0 if !input.is_empty() => {
                let i = self.rng.random_range(0..input.len());
                input[i] ^= 1 << self.rng.random_range(0..8);
            }
            1 if !input.is_empty() => {
                let i = self.rng.random_range(0..input.len());
                input[i] = self.rng.random();
            }
            2 => {
                let i = at(&mut self.rng, input);
                let value = INTERESTING[self.rng.random_range(0..INTERESTING.len())];
                let end = (i + value.len()).min(input.len());
                input.splice(i..end, value.iter().copied());
            }
            3 if !input.is_empty() => {
                let start = self.rng.random_range(0..input.len());
                let end = (start + self.rng.random_range(1..=16)).min(input.len());
                input.drain(start..end);
            }
            4 if !input.is_empty() => {
                let start = self.rng.random_range(0..input.len());
                let end = (start + self.rng.random_range(1..=64)).min(input.len());
                let copy = input[start..end].to_vec();
                let i = at(&mut self.rng, input);
                input.splice(i..i, copy);
            }
            5 if !self.dictionary.is_empty() => {
                let word = self.dictionary[self.rng.random_range(0..self.dictionary.len())];
                let i = at(&mut self.rng, input);
                input.splice(i..i, word.iter().copied());
            }
            6 if !self.seeds.is_empty() => {
                let other = &self.seeds[self.rng.random_range(0..self.seeds.len())];
                let from = self.rng.random_range(0..=other.len());
                let i = at(&mut self.rng, input);
                input.truncate(i);
                input.extend_from_slice(&other[from..]);
            }
            7 => {
                let i = at(&mut self.rng, input);
                let len = self.rng.random_range(1..=8);
                let bytes: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                input.splice(i..i, bytes);
            }
            _ => {
                let i = at(&mut self.rng, input);
                input.truncate(i);
            }
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub executions: u64,
    /// The first input that panicked, if any (the run stops there).
    pub crash: Option<Vec<u8>>,
}

/// Runs `target` over its seeds, then over mutated inputs until `cases` have run or `deadline` passes.
/// A panicking input is saved under `fuzz/artifacts/<target>/` and returned.
pub fn run(target: &str, seed: u64, cases: u64, deadline: Option<Instant>) -> Outcome {
    let function = crate::target(target).unwrap_or_else(|| panic!("no fuzz target {target:?}"));
    let mut mutator = Mutator::new(target, seed);
    let mut executions = 0;
    let fixed: Vec<Vec<u8>> = mutator.seeds.clone();
    let mut inputs = fixed.into_iter();
    while executions < cases && deadline.is_none_or(|d| executions % 64 != 0 || Instant::now() < d) {
        let input = inputs.next().unwrap_or_else(|| mutator.next_input());
        executions += 1;
        if std::panic::catch_unwind(|| function(&input)).is_err() {
            save_crash(target, &input);
            return Outcome { executions, crash: Some(input) };
        }
    }
    Outcome { executions, crash: None }
}

fn save_crash(target: &str, input: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts").join(target);
    let name = format!("crash-{:016x}", fnv1a(input));
    if std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(&name), input)).is_ok() {
        eprintln!("saved {}", dir.join(name).display());
    }
}

/// A stable name for an input, without another dependency.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}
