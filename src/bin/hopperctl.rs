//! The `hopperctl` binary: the operator's client. Everything is in [`hopper_delegation::ctl`].

fn main() -> std::process::ExitCode {
    hopper_delegation::ctl::main()
}
