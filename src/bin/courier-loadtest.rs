//! `courier-loadtest`: points a device swarm and provider load at a Courier cluster (or one it spawns).
//! Everything lives in the `courier-loadtest` library; see `courier-loadtest --help`.

fn main() -> std::process::ExitCode {
    courier_loadtest::main()
}
