//! # testkit — real dependencies for tests, started per test run
//!
//! - [`pg`]: a throwaway PostgreSQL cluster from the system's binaries (`initdb`,
//!   `pg_ctl`), or the server named by `DATABASE_URL`; a fresh database per test.
//! - [`kafka`]: librdkafka's mock cluster (a real Kafka wire-protocol server), or the
//!   brokers named by `KAFKA_BROKERS`; random topic names per test.
//! - [`stack`]: the gateway's services (API, worker, sink, provider simulator) started
//!   in-process or, for the worker, as a child process that can be killed.
//! - [`procs`]: the gateway's services as separate OS processes, killed and restarted
//!   by the harnesses (`make chaos`, `make soak`), and their client load.
//! - [`client`]: a small API client and what tests read back (terminal states,
//!   histories, the events topic).
//! - [`otlp`]: an OTLP/HTTP trace receiver that keeps the spans it is sent, and can
//!   play a collector that is down.
//! - [`verify`]: the verdicts every harness states the same way (the provider's ledger
//!   against the projection, a history replayed through the domain).
//!
//! Tests are quiet unless `TEST_LOG` is set (then `RUST_LOG` filters).

pub mod client;
pub mod kafka;
pub mod merchant;
pub mod otlp;
pub mod pg;
pub mod procs;
pub mod stack;
pub mod verify;

/// Sets up logging once for a test process (only when `TEST_LOG` is set).
pub fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let mut cfg = telemetry::Config::from_env("gateway-test", false);
        cfg.otlp_endpoint = None;
        let _ = telemetry::init(&cfg);
    }
}
