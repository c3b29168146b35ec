//! Prints the path of the fast test guest ELF built by tests/build.rs, so
//! scripts can boot it with the `iovmm` CLI.

fn main() {
    println!("{}", integration_tests::guest::test_guest_path().display());
}
