//! strata-img: placeholder entry point until the CLI lands.
fn main() {
    eprintln!("strata-img: not built yet");
    std::process::exit(1);
}
