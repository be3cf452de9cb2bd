//! The processor API: records, the context a processor sees, the `Processor` trait, and
//! ([`spec`]) what a processor type tells the compiler and how it is built. A processor
//! type sees only this module (and the domain); never the compiler.

pub mod spec;

pub use spec::{
    parse_params, BuildContext, Configured, NodeSpec, ProcessorSupplier, Span, StoreBinding,
    StoreKind,
};

pub use payments::notify::Notification;
pub use payments::wire::DeadLetter;
use payments::{Command, Event, PaymentId, ProviderOp};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use stores::{dedup, PartitionStore, StoreError, WriteSet};

/// What flows along the edges of the topology.
#[derive(Debug, Clone)]
pub enum Record {
    /// Bytes as read from a source topic.
    Raw(RawRecord),
    Command(Command),
    Event(Event),
    ProviderCall(ProviderCall),
    DeadLetter(DeadLetter),
    Notification(Notification),
}

/// Kinds of records, used to check at compile time that every output has a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    Raw,
    Command,
    Event,
    ProviderCall,
    DeadLetter,
    Notification,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Raw => "raw",
            RecordKind::Command => "command",
            RecordKind::Event => "event",
            RecordKind::ProviderCall => "provider_call",
            RecordKind::DeadLetter => "dead_letter",
            RecordKind::Notification => "notification",
        }
    }
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Raw(_) => RecordKind::Raw,
            Record::Command(_) => RecordKind::Command,
            Record::Event(_) => RecordKind::Event,
            Record::ProviderCall(_) => RecordKind::ProviderCall,
            Record::DeadLetter(_) => RecordKind::DeadLetter,
            Record::Notification(_) => RecordKind::Notification,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RawRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

/// A provider call the topology wants made once its decision is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderCall {
    pub payment_id: PaymentId,
    pub op: ProviderOp,
    pub attempt: u32,
    /// Names this request; the reply command id is derived from it.
    pub request_key: String,
    /// Sent to the provider; the same for every call about the payment.
    pub idempotency_key: String,
    pub amount: i64,
    pub currency: String,
    pub traceparent: Option<String>,
}

/// A dead letter for a raw input record.
pub fn dead_letter(
    raw: &RawRecord,
    processor: &str,
    reason: &str,
    detail: String,
    now_ms: i64,
) -> DeadLetter {
    let lossy = |b: &Option<Vec<u8>>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    DeadLetter {
        reason: reason.to_owned(),
        detail,
        source_topic: raw.topic.clone(),
        source_partition: raw.partition,
        source_offset: raw.offset,
        processor: processor.to_owned(),
        key: lossy(&raw.key),
        payload: lossy(&raw.payload),
        failed_at_ms: now_ms,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The partition store failed: the task stops and restarts from its checkpoint.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("processor `{processor}` cannot handle a {kind} record; the topology wiring is wrong")]
    UnexpectedRecord {
        processor: String,
        kind: &'static str,
    },
}

/// Where a step's input record was read (none for timers and housekeeping): what a
/// dead letter names as its source.
#[derive(Debug, Clone)]
pub struct InputPosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A timer set by a processor, delivered back to it by [`Processor::on_timer`].
#[derive(Debug, Clone)]
pub struct TimerRequest {
    pub due_at_ms: i64,
    /// Distinguishes timers due at the same time.
    pub id: Vec<u8>,
    pub payload: Vec<u8>,
}

/// What a processor may touch while handling one record: its stores (reads see the
/// writes staged for this record), the output, and timers. Everything it stages is
/// committed atomically with the input offset, or not at all.
pub struct Context<'a> {
    pub(crate) store: &'a PartitionStore,
    pub(crate) ws: &'a mut WriteSet,
    pub(crate) out: Vec<Record>,
    pub(crate) timers: Vec<TimerRequest>,
    /// Timers to remove: `(due_at_ms, id)` as they were scheduled.
    pub(crate) cancels: Vec<(i64, Vec<u8>)>,
    pub(crate) input: Option<&'a InputPosition>,
    pub(crate) now_ms: i64,
    pub(crate) processor_id: &'a str,
    /// W3C trace context of the input record (its `traceparent` header).
    pub(crate) trace_in: Option<&'a str>,
    /// Trace context for what this step emits, set by the processor that traced it.
    pub(crate) trace_out: Option<String>,
}

impl<'a> Context<'a> {
    pub fn get<T: DeserializeOwned>(
        &self,
        store: &str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.ws.staged(store, key) {
            Some(Some(bytes)) => stores::decode(store, bytes).map(Some),
            Some(None) => Ok(None),
            None => self.store.get(store, key),
        }
    }

    pub fn put<T: Serialize>(&mut self, store: &str, key: &[u8], value: &T) {
        self.ws.put(store, key, value);
    }

    /// The stored bytes, for values with an encoding of their own (a versioned one).
    pub fn get_raw(&self, store: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.ws.staged(store, key) {
            Some(staged) => Ok(staged.map(<[u8]>::to_vec)),
            None => self.store.get_raw(store, key),
        }
    }

    /// Up to `limit` committed entries of `store` from key `from` on, in key order
    /// (for housekeeping passes; writes staged in this step are not seen).
    pub fn scan_from(
        &self,
        store: &str,
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<stores::Entry>, StoreError> {
        self.store.range_from(store, from, limit)
    }

    pub fn put_raw(&mut self, store: &str, key: &[u8], value: Vec<u8>) {
        self.ws.put_raw(store, key, value);
    }

    /// Deletes a key (a tombstone on the changelog).
    pub fn delete(&mut self, store: &str, key: &[u8]) {
        self.ws.delete(store, key);
    }

    pub fn seen(
        &self,
        dedup_store: &str,
        id: &str,
        retention: dedup::Retention,
    ) -> Result<bool, StoreError> {
        dedup::seen(self.store, self.ws, dedup_store, id, self.now_ms, retention)
    }

    pub fn remember(&mut self, dedup_store: &str, id: &str, retention: dedup::Retention) {
        dedup::record(self.ws, dedup_store, id, self.now_ms, retention);
    }

    /// Removes up to `limit` dedup records past `retention`.
    pub fn prune(
        &mut self,
        dedup_store: &str,
        retention: dedup::Retention,
        limit: usize,
    ) -> Result<usize, StoreError> {
        dedup::prune(
            self.store,
            self.ws,
            dedup_store,
            self.now_ms,
            retention,
            limit,
        )
    }

    pub fn forward(&mut self, record: Record) {
        self.out.push(record);
    }

    pub fn schedule(&mut self, timer: TimerRequest) {
        self.timers.push(timer);
    }

    /// Removes a timer this processor scheduled, named by its due time and id, before
    /// it fires (nothing happens if it already fired).
    pub fn cancel(&mut self, due_at_ms: i64, id: Vec<u8>) {
        self.cancels.push((due_at_ms, id));
    }

    /// A dead letter for this step's input record, with the processor's reading of it.
    pub fn dead_letter(
        &self,
        reason: &str,
        detail: String,
        key: Option<String>,
        payload: Option<String>,
    ) -> DeadLetter {
        let (topic, partition, offset) = self.input.map_or((String::new(), -1, -1), |i| {
            (i.topic.clone(), i.partition, i.offset)
        });
        DeadLetter {
            reason: reason.to_owned(),
            detail,
            source_topic: topic,
            source_partition: partition,
            source_offset: offset,
            processor: self.processor_id.to_owned(),
            key,
            payload,
            failed_at_ms: self.now_ms,
        }
    }

    /// Wall-clock time of this processing step (for metadata, never for decisions that
    /// must replay identically).
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The `traceparent` the input record arrived with (none for timers).
    pub fn incoming_trace(&self) -> Option<&str> {
        self.trace_in
    }

    /// Records published for this step carry `traceparent` in their headers.
    pub fn set_outgoing_trace(&mut self, traceparent: Option<String>) {
        if traceparent.is_some() {
            self.trace_out = traceparent;
        }
    }
}

/// A node of the topology that transforms records. One instance per task (partition).
pub trait Processor: Send + Sync {
    fn process(&mut self, ctx: &mut Context<'_>, record: Record) -> Result<(), ProcessError>;

    /// A timer this processor scheduled has come due.
    fn on_timer(&mut self, _ctx: &mut Context<'_>, _payload: &[u8]) -> Result<(), ProcessError> {
        Ok(())
    }

    /// Periodic housekeeping (for example pruning dedup records past their retention).
    fn maintain(&mut self, _ctx: &mut Context<'_>) -> Result<(), ProcessError> {
        Ok(())
    }
}

/// Runs processors alone, against a throwaway store: for the unit tests beside each
/// processor type.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::collections::BTreeMap;

    /// Configures a processor type's node with `params` (TOML) and no stores.
    pub fn configure(spec: &NodeSpec, params: &str) -> Result<Configured, Vec<String>> {
        let params: toml::Value = toml::from_str(params).expect("params are TOML");
        (spec.configure)(&BuildContext {
            id: "under_test",
            params: &params,
            stores: BTreeMap::new(),
            sources: vec![],
        })
    }

    /// A create of `amount` minor units of `currency`, for merchant `acme` and
    /// Idempotency-Key `key`.
    pub fn create_command(key: &str, amount: i64, currency: &str, issued_at_ms: i64) -> Command {
        use payments::{
            Amount, CommandBody, CommandId, CreatePayment, Currency, IdempotencyKey, MerchantId,
        };
        let merchant = MerchantId::parse("acme").expect("merchant id");
        let key = IdempotencyKey::parse(key).expect("idempotency key");
        Command {
            command_id: CommandId::parse("create-1").expect("command id"),
            payment_id: PaymentId::derive(&merchant, &key),
            issued_at_ms,
            body: CommandBody::Create(CreatePayment {
                merchant_id: merchant,
                amount: Amount::new(amount).expect("amount"),
                currency: Currency::parse(currency).expect("currency"),
                idempotency_key: key,
                request_hash: "h".into(),
                reference: None,
                description: None,
                metadata: Default::default(),
                traceparent: None,
                screening: None,
            }),
        }
    }

    /// What one call of `process` forwarded.
    pub fn process(p: &mut dyn Processor, record: Record) -> Vec<Record> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = PartitionStore::open(dir.path(), "app", "t", 0).expect("store");
        let mut ws = WriteSet::default();
        let input = InputPosition {
            topic: "t".into(),
            partition: 0,
            offset: 7,
        };
        let mut ctx = Context {
            store: &store,
            ws: &mut ws,
            out: vec![],
            timers: vec![],
            cancels: vec![],
            input: Some(&input),
            now_ms: 1_000,
            processor_id: "under_test",
            trace_in: None,
            trace_out: None,
        };
        p.process(&mut ctx, record).expect("process");
        ctx.out
    }
}
