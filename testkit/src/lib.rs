//! # testkit — real dependencies for tests, started per test run
//!
//! - [`pg`]: a throwaway PostgreSQL cluster from the system's binaries (`initdb`,
//!   `pg_ctl`), or the server named by `DATABASE_URL`; a fresh database per test.
//! - [`broker`]: Apache Kafka 4.4 KRaft nodes as Java processes (the jars `make kafka`
//!   caches), killed and restarted by the harnesses; [`netproxy`]: a TCP proxy per node
//!   that breaks the network between the clients and a broker.
//! - [`kafka`]: one shared broker per test process, a cluster of a test's own, or the
//!   brokers named by `KAFKA_BROKERS`; random topic names per test; whole-topic reads
//!   as a `read_committed` or a `read_uncommitted` consumer sees them.
//! - [`stack`]: the gateway's services (API, worker, sink, provider simulator) started
//!   in-process or, for the worker, as a child process that can be killed.
//! - [`procs`]: the gateway's services as separate OS processes, killed and restarted
//!   by the harnesses (`make chaos`, `make soak`), and their client load;
//!   [`procstack`]: a whole stack of them, as deployed, for `make bench`.
//! - [`cpu`]: a process tree's CPU time (`/proc`) and its pinning to a CPU.
//! - [`client`]: a small API client and what tests read back (terminal states,
//!   histories, the events topic).
//! - [`jaeger`]: a real Jaeger (the binary `make jaeger` builds), all-in-one with
//!   in-memory storage, killed and restarted by tests, and a client for its query API
//!   that reads a payment's traces back.
//! - [`otlp`]: an OTLP/HTTP trace receiver that keeps the spans it is sent, and can
//!   play a collector that is down (for span checks at unit level).
//! - [`txaudit`]: exactly-once judged from outside: an output topic read whole by a
//!   `read_committed` consumer against the brokers' log segments (duplicates, records of
//!   aborted transactions, transactions left open).
//! - [`verify`]: the verdicts every harness states the same way (the provider's ledger
//!   against the projection, a history replayed through the domain).
//!
//! - [`ports`]: loopback ports for the servers a test starts, from below the kernel's
//!   ephemeral range so that no outgoing connection takes one before its server binds it.
//!
//! Tests are quiet unless `TEST_LOG` is set (then `RUST_LOG` filters).

pub mod broker;
pub mod client;
pub mod cpu;
pub mod jaeger;
pub mod kafka;
pub mod merchant;
pub mod netproxy;
pub mod otlp;
pub mod pg;
pub mod ports;
pub mod procs;
pub mod procstack;
pub mod stack;
pub mod txaudit;
pub mod verify;

/// Sets up logging once for a test process (only when `TEST_LOG` is set).
pub fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let mut cfg = telemetry::Config::from_env("gateway-test", false);
        cfg.otlp_endpoint = None;
        let _ = telemetry::init(&cfg);
    }
}

/// Where a `make` target caches what the tests run: the path in `var` when it is set,
/// else `<XDG_CACHE_HOME or ~/.cache>/payment-gateway/<under>`, as the Makefile has it.
pub(crate) fn cached(var: &str, under: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("payment-gateway")
        .join(under)
}
