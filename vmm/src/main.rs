//! The `iovmm` command-line tool (a thin wrapper over [`vmm::cli`]).

fn main() -> std::process::ExitCode {
    vmm::cli::main_entry()
}
