//! Worker metrics, registered once in the process-wide Prometheus registry.
//!
//! Labels are bounded sets (command types, reasons, statuses, partitions): never a
//! payment id.

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
};
use std::sync::LazyLock;

pub struct Metrics {
    pub commands: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub ignored: IntCounterVec,
    pub rejected: IntCounterVec,
    pub events: IntCounterVec,
    pub terminal: IntCounterVec,
    pub processing_seconds: Histogram,
    pub retries: IntCounterVec,
    pub stuck: IntCounter,
    pub dlq_messages: IntCounterVec,
    pub timers: IntCounterVec,
    pub provider_requests: IntCounterVec,
    pub provider_seconds: HistogramVec,
    pub consumer_lag: IntGaugeVec,
    pub errors: IntCounterVec,
    pub batch_seconds: Histogram,
    pub stage_seconds: HistogramVec,
    pub restore_seconds: HistogramVec,
    pub stores_discarded: IntCounterVec,
    pub timers_cancelled: IntCounterVec,
    pub payments_expired: IntCounter,
    pub store_keys: IntGaugeVec,
    pub notifications: IntCounterVec,
    pub input_gaps: IntCounter,
}

fn build() -> Result<Metrics, prometheus::Error> {
    Ok(Metrics {
        commands: register_int_counter_vec!(
            "gateway_commands_total",
            "Commands received by the topology",
            &["type"]
        )?,
        duplicates: register_int_counter_vec!(
            "gateway_duplicates_dropped_total",
            "Commands dropped because their id was already applied",
            &["type"]
        )?,
        ignored: register_int_counter_vec!(
            "gateway_commands_ignored_total",
            "Commands without effect: stale or out-of-order input handled",
            &["reason"]
        )?,
        rejected: register_int_counter_vec!(
            "gateway_commands_rejected_total",
            "Commands the state machine refused",
            &["code"]
        )?,
        events: register_int_counter_vec!("gateway_events_total", "Events emitted", &["type"])?,
        terminal: register_int_counter_vec!(
            "gateway_payments_terminal_total",
            "Payments that reached a terminal state",
            &["status"]
        )?,
        processing_seconds: register_histogram!(
            "gateway_payment_processing_seconds",
            "Time from creation to terminal state",
            vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
        )?,
        retries: register_int_counter_vec!(
            "gateway_retries_total",
            "Retries scheduled",
            &["stage"]
        )?,
        stuck: register_int_counter!(
            "gateway_payments_stuck_total",
            "Payments marked stuck after unanswered status checks"
        )?,
        dlq_messages: register_int_counter_vec!(
            "gateway_dlq_messages_total",
            "Input records sent to the dead-letter topic",
            &["reason"]
        )?,
        timers: register_int_counter_vec!(
            "gateway_timers_fired_total",
            "Timers that came due",
            &["kind"]
        )?,
        provider_requests: register_int_counter_vec!(
            "gateway_provider_requests_total",
            "Provider calls by outcome",
            &["op", "outcome"]
        )?,
        provider_seconds: register_histogram_vec!(
            "gateway_provider_request_duration_seconds",
            "Provider call duration",
            &["op", "outcome"],
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
        )?,
        consumer_lag: register_int_gauge_vec!(
            "gateway_consumer_lag",
            "Records behind the partition end",
            &["group", "topic", "partition"]
        )?,
        errors: register_int_counter_vec!("gateway_errors_total", "Errors by type", &["type"])?,
        batch_seconds: register_histogram!(
            "gateway_task_batch_seconds",
            "Time to process, persist and publish one batch of a task",
            vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
        )?,
        stage_seconds: register_histogram_vec!(
            "gateway_task_stage_seconds",
            "Time a task's batch spends in each stage: apply (processors and sled commits), flush (sled fsync), changelog (shipping it), outputs (events and dead letters), transaction (exactly_once: changelog, outputs and offsets)",
            &["stage"],
            vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
        )?,
        restore_seconds: register_histogram_vec!(
            "gateway_store_restore_seconds",
            "Time from a partition's assignment until its store is open and verified current",
            &["source"],
            vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]
        )?,
        stores_discarded: register_int_counter_vec!(
            "gateway_stores_discarded_total",
            "Partition stores found to follow another log than the broker's (a reset or replaced cluster) and rebuilt from what the broker has",
            &["reason"]
        )?,
        timers_cancelled: register_int_counter_vec!(
            "gateway_timers_cancelled_total",
            "Timers removed before firing because the wait they guarded was over",
            &["kind"]
        )?,
        notifications: register_int_counter_vec!(
            "gateway_notifications_made_total",
            "Merchant notifications made by the topology (status changes), by type",
            &["type"]
        )?,
        input_gaps: register_int_counter!(
            "gateway_input_gaps_total",
            "Times a task's next input record was not the one after its checkpoint (transaction markers, aborted records, or records not delivered)"
        )?,
        payments_expired: register_int_counter!(
            "gateway_payments_expired_total",
            "Finished payments removed from the partition stores after their state_retention (a changelog tombstone each)"
        )?,
        store_keys: register_int_gauge_vec!(
            "gateway_store_keys",
            "Keys held per partition store (payments, dedup records, timers, outbox, changelog queue), counted once a minute",
            &["task", "store"]
        )?,
    })
}

/// The worker's metrics. Registration fails only on a duplicate name, a programming
/// error caught by every test run.
#[allow(clippy::expect_used)]
pub static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| build().expect("worker metrics register once"));
