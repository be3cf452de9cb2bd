//! Connection pool and migrations.

use anyhow::Context as _;
pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use tokio_postgres::NoTls;

/// Migrations in order; each runs once, recorded in `schema_migrations`.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_projection",
        include_str!("../migrations/0001_projection.sql"),
    ),
    (
        "0002_waiting_events",
        include_str!("../migrations/0002_waiting_events.sql"),
    ),
    (
        "0003_refunds",
        include_str!("../migrations/0003_refunds.sql"),
    ),
    (
        "0004_notifications",
        include_str!("../migrations/0004_notifications.sql"),
    ),
    (
        "0005_notification_indexes",
        include_str!("../migrations/0005_notification_indexes.sql"),
    ),
    (
        "0006_drop_unused_due_index",
        include_str!("../migrations/0006_drop_unused_due_index.sql"),
    ),
    (
        "0007_drop_payments_key_unique",
        include_str!("../migrations/0007_drop_payments_key_unique.sql"),
    ),
    (
        "0008_notification_trace",
        include_str!("../migrations/0008_notification_trace.sql"),
    ),
];

/// Arbitrary constant naming the advisory lock that serialises migrations.
const MIGRATION_LOCK: i64 = 0x0067_6174_6577_6179;

pub fn connect(database_url: &str, max_size: usize) -> anyhow::Result<Pool> {
    let mut cfg: tokio_postgres::Config = database_url
        .parse()
        .with_context(|| "DATABASE_URL is not a valid PostgreSQL connection string (postgres://user:pass@host:port/db)")?;
    // Statements are prepared once per connection, and several select by `= ANY($1)`
    // over a batch's ids: a generic plan, made without the array, scans the whole
    // table. Each execution is planned with its parameters instead.
    let options = format!(
        "{} -c plan_cache_mode=force_custom_plan",
        cfg.get_options().unwrap_or_default()
    );
    cfg.options(options.trim_start());
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(max_size)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .context("building the PostgreSQL pool")
}

/// Applies pending migrations. Safe to call from several processes at once.
pub async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .context("connecting to PostgreSQL for migrations")?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        .await?;
    for (name, sql) in MIGRATIONS {
        let done = tx
            .query_opt("SELECT 1 FROM schema_migrations WHERE name = $1", &[name])
            .await?;
        if done.is_none() {
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {name} failed"))?;
            tx.execute("INSERT INTO schema_migrations (name) VALUES ($1)", &[name])
                .await?;
            tracing::info!(migration = name, "applied");
        }
    }
    tx.commit().await?;
    Ok(())
}
