//! Rebuild when the `bpf-linker` binary changes (it is an undeclared
//! dependency of this crate; see aya-template for the long story).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask run` or `cargo xtask test`, which install it"
        ),
    }
}
