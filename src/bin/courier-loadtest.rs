//! `courier-loadtest`: points a device swarm and provider load at a Courier cluster (or one it spawns).
//! Everything lives in the `courier-loadtest` library; see `courier-loadtest --help`.

/// The same allocator as `courier` (see src/main.rs), so that the load generator spends as little of the
/// shared cores as it can.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    courier_loadtest::main()
}
