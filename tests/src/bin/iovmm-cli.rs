//! The `iovmm` CLI built inside this package, so integration tests can run
//! it as `CARGO_BIN_EXE_iovmm-cli` (cargo builds a package's own binaries
//! for its tests, not other packages' ones). Same code as `vmm`'s `iovmm`.

fn main() -> std::process::ExitCode {
    vmm::cli::main_entry()
}
