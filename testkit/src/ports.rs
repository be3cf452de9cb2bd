//! Loopback ports for the servers a test starts (brokers, PostgreSQL, Jaeger, the
//! gateway's processes).
//!
//! A port is picked free and released before its server binds it, and a server the
//! harnesses restart binds the same port again. A port from the kernel's ephemeral range
//! (`bind(…:0)`) can be taken in between as the local end of any outgoing connection,
//! and a test opens thousands of them (Kafka clients, HTTP). So these ports come from
//! below that range, where the kernel never hands out a port on its own, are checked free
//! by binding them, and are never handed out twice in one process.

use anyhow::Context as _;
use rand::RngExt as _;
use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// The lowest port handed out: above the registered services a test machine may run.
const LOWEST: u16 = 12000;

/// The first port of the kernel's ephemeral range (Linux's default when unreadable).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback port outside the ephemeral range, not given before in this process.
pub fn free_port() -> anyhow::Result<u16> {
    let high = ephemeral_start();
    anyhow::ensure!(
        high > LOWEST + 1000,
        "the ephemeral port range starts at {high} (net.ipv4.ip_local_port_range), leaving no room below it for test servers; raise its first port above {}",
        LOWEST + 1000
    );
    let mut given = GIVEN
        .lock()
        .map_err(|_| anyhow::anyhow!("the port registry's lock was poisoned"))?;
    let given = given.get_or_insert_with(HashSet::new);
    let mut rng = rand::rng();
    for _ in 0..500 {
        let port = rng.random_range(LOWEST..high);
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.insert(port);
        return Ok(port);
    }
    anyhow::bail!("no free loopback port between {LOWEST} and {high} after 500 tries")
}

/// `127.0.0.1:<port>` for a free port (see [`free_port`]).
pub fn free_addr() -> anyhow::Result<String> {
    free_port()
        .map(|p| format!("127.0.0.1:{p}"))
        .context("picking a listen address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for p in &ports {
            assert!(
                (LOWEST..ephemeral_start()).contains(p),
                "port {p} is out of range"
            );
        }
        let _held = TcpListener::bind(("127.0.0.1", ports[0])).expect("a handed-out port binds");
    }
}
