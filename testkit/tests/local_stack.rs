//! `make local-stack` never announces a part that cannot start: with a port it needs
//! taken, it names the port and the part and exits non-zero, before starting anything.

use std::process::Command;
use std::time::{Duration, Instant};

fn local_stack_with_taken(flag: &str, part: &str) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let free = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let mut args = vec![
        "--api".to_owned(),
        free(()),
        "--provider".to_owned(),
        free(()),
        "--ui".to_owned(),
        free(()),
    ];
    let at = args.iter().position(|a| a == flag).unwrap();
    args[at + 1] = addr.clone();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_local-stack"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "local-stack started with {flag} {addr} taken: {stdout}"
    );
    assert!(
        stderr.contains(&addr) && stderr.contains(part) && stderr.contains(flag),
        "the error names neither the port, the part nor the flag: {stderr}"
    );
    assert!(
        !stdout.contains("local stack ready"),
        "the banner was printed: {stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    println!(
        "local-stack: {flag} {addr} taken -> exit {} in {:.1} s: {}",
        out.status,
        started.elapsed().as_secs_f64(),
        stderr
            .lines()
            .find(|l| l.starts_with("Error:"))
            .unwrap_or_default()
    );
    drop(taken);
}

#[test]
fn a_taken_port_is_named_with_its_part_and_stops_the_stack() {
    let payctl = std::path::Path::new(env!("CARGO_BIN_EXE_local-stack")).with_file_name("payctl");
    local_stack_with_taken("--api", "the API");
    local_stack_with_taken("--provider", "the provider simulator");
    // The test client's port is checked when the client is built (it is, in `make test`).
    if payctl.exists() {
        local_stack_with_taken("--ui", "the web test client");
    } else {
        panic!(
            "payctl is not built beside local-stack ({}): build it with `cargo build -p payment-client` (make test does)",
            payctl.display()
        );
    }
}
