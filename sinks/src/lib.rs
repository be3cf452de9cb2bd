//! # sinks — the PostgreSQL projection and its readers
//!
//! Layout:
//! - [`db`]: connection pool and migrations (applied automatically, under an advisory lock).
//! - [`projection`]: applies batches of topic records to the tables — idempotent per
//!   `(payment_id, seq)`, never regressing a payment, progress committed in the same
//!   transaction.
//! - [`runner`]: the sink service (consumer loop with retries) and the rebuild command.
//! - [`query`]: the read side used by the HTTP API.
//!
//! PostgreSQL is a projection: everything here can be dropped and rebuilt from Kafka.

pub mod db;
pub mod notifier;
pub mod projection;
pub mod query;
pub mod runner;

pub use db::{connect, migrate, Pool};
