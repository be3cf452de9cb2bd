//! The processor inside a task on a real partition store: timers cancelled when their
//! wait is over, finished payments expired by a tombstone, and nothing late acting on
//! an expired payment.

use super::stored;
use crate::processor::RawRecord;
use crate::task::{testing, OutboxEntry, Task};
use payments::wire::DeadLetter;
use payments::{
    Command, CommandBody, CommandId, IdempotencyKey, MerchantId, PaymentId, ProviderOp,
    ProviderOutcome, WebhookOutcome,
};
use stores::{PartitionStore, TIMERS};

const TOPIC: &str = "payments.commands";
const T0: i64 = 1_800_000_000_000;
const DAY: i64 = 86_400_000;
/// The shipped `state_retention`.
const RETENTION: i64 = 8 * DAY;
/// The shipped `reply_timeout_ms` and `webhook_timeout_ms`.
const REPLY_TIMEOUT: i64 = 10_000;
const WEBHOOK_TIMEOUT: i64 = 30_000;

/// What one step published.
#[derive(Debug, Default)]
struct Outputs {
    events: Vec<String>,
    calls: Vec<ProviderOp>,
    dead_letters: Vec<DeadLetter>,
    /// The notification types made (the shipped topology notifies merchants).
    notifications: Vec<String>,
}

struct Partition {
    task: Task,
    offset: i64,
    payment_id: PaymentId,
    merchant: MerchantId,
    _dir: tempfile::TempDir,
}

impl Partition {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = PartitionStore::open(dir.path(), "app", TOPIC, 0).expect("store");
        let task = testing::shipped(store, TOPIC, true);
        let merchant = MerchantId::parse("acme").expect("merchant id");
        let key = IdempotencyKey::parse("order-1").expect("key");
        Partition {
            task,
            offset: 0,
            payment_id: PaymentId::derive(&merchant, &key),
            merchant,
            _dir: dir,
        }
    }

    /// The create of this partition's payment (merchant `acme`, key `order-1`).
    fn create_body(&self) -> CommandBody {
        crate::processor::testing::create_command("order-1", 1_000, "EUR", 0).body
    }

    /// Applies one command at `now` and returns what it published.
    fn send(&mut self, id: &str, issued_at_ms: i64, body: CommandBody, now: i64) -> Outputs {
        let cmd = Command {
            command_id: CommandId::parse(id).expect("command id"),
            payment_id: self.payment_id,
            issued_at_ms,
            body,
        };
        let raw = RawRecord {
            topic: TOPIC.into(),
            partition: 0,
            offset: self.offset,
            key: Some(self.payment_id.to_string().into_bytes()),
            payload: Some(payments::wire::encode_command(&cmd)),
            headers: vec![],
            timestamp_ms: Some(issued_at_ms),
        };
        self.offset += 1;
        assert_eq!(self.task.apply_inputs([raw], now).ok(), Some(1));
        self.published()
    }

    fn create(&mut self, issued_at_ms: i64, now: i64) -> Outputs {
        let body = self.create_body();
        self.send("create-1", issued_at_ms, body, now)
    }

    fn fire(&mut self, now: i64) -> (usize, Outputs) {
        let fired = self.task.fire_timers(now, 100).expect("fire timers");
        (fired, self.published())
    }

    /// Takes the outbox: what the step would publish.
    fn published(&mut self) -> Outputs {
        let pending = self.task.pending().expect("outbox");
        let mut out = Outputs::default();
        let mut keys = Vec::new();
        for (key, entry) in pending.entries {
            keys.push(key);
            match entry {
                OutboxEntry::Provider(call) => out.calls.push(call.op),
                OutboxEntry::Kafka { topic, payload, .. } if topic == "payments.dlq" => out
                    .dead_letters
                    .push(serde_json::from_slice(&payload).expect("a dead letter")),
                OutboxEntry::Kafka { topic, payload, .. } if topic == "payments.notifications" => {
                    let n: payments::notify::Notification =
                        serde_json::from_slice(&payload).expect("a notification");
                    out.notifications.push(n.kind);
                }
                OutboxEntry::Kafka { key, payload, .. } => {
                    let event = payments::wire::decode_event(key.as_deref(), Some(&payload))
                        .expect("an event");
                    out.events.push(event.body.kind().to_owned());
                }
            }
        }
        self.task.published(keys).expect("publish");
        out
    }

    fn stored(&self) -> Option<stored::StoredPayment> {
        self.task
            .store()
            .get_raw("payments", &self.payment_id.key_bytes())
            .expect("read")
            .map(|b| stored::decode("payments", &b).expect("decode"))
    }

    fn timers(&self) -> usize {
        self.task
            .store()
            .scan(TIMERS, usize::MAX)
            .expect("timers")
            .len()
    }

    /// A completed payment: created at `T0`, approved 100 ms later.
    fn completed() -> Self {
        let mut p = Partition::new();
        let out = p.create(T0, T0);
        assert_eq!(out.calls, vec![ProviderOp::Charge]);
        let approved = CommandBody::ProviderReply {
            op: ProviderOp::Charge,
            attempt: 1,
            outcome: ProviderOutcome::Approved {
                provider_ref: "ch_1".into(),
            },
        };
        p.send("reply-1", T0 + 100, approved, T0 + 100);
        assert_eq!(
            p.stored().map(|s| s.state.status.as_str()),
            Some("COMPLETED")
        );
        p
    }
}

#[test]
fn a_timer_whose_wait_is_over_is_cancelled() {
    let mut p = Partition::new();
    p.create(T0, T0);
    assert!(p.task.timers_due(T0 + REPLY_TIMEOUT).expect("timers"));
    // The provider accepts the charge and will answer by webhook: the reply's wait is
    // over, the webhook's begins.
    let pending = CommandBody::ProviderReply {
        op: ProviderOp::Charge,
        attempt: 1,
        outcome: ProviderOutcome::Pending {
            provider_ref: "ch_1".into(),
        },
    };
    p.send("reply-1", T0 + 50, pending, T0 + 50);
    assert!(
        !p.task.timers_due(T0 + REPLY_TIMEOUT).expect("timers"),
        "the reply timeout of a charge already answered is still set"
    );
    assert!(p
        .task
        .timers_due(T0 + 50 + WEBHOOK_TIMEOUT)
        .expect("timers"));
    assert_eq!(p.timers(), 1);
    assert_eq!(p.stored().map(|s| s.timers.len()), Some(1));
    // The webhook ends the payment: no timer but its expiry is left.
    let webhook = CommandBody::Webhook {
        webhook_id: "wh-1".into(),
        outcome: WebhookOutcome::Succeeded {
            provider_ref: "ch_1".into(),
        },
    };
    let out = p.send("webhook-1", T0 + 80, webhook, T0 + 80);
    assert!(out.events.iter().any(|e| e == "completed"), "{out:?}");
    assert_eq!(out.notifications, ["payment.completed"], "{out:?}");
    assert_eq!(p.timers(), 1, "only the expiry timer remains");
    assert!(!p.task.timers_due(T0 + 80 + RETENTION - 1).expect("timers"));
    assert!(p.task.timers_due(T0 + 80 + RETENTION).expect("timers"));
}

#[test]
fn a_finished_payment_leaves_the_store_after_its_retention_as_a_tombstone() {
    let mut p = Partition::completed();
    let expires = T0 + 100 + RETENTION;
    assert_eq!(p.stored().and_then(|s| s.expires_at_ms), Some(expires));
    assert_eq!(p.fire(expires - 1).0, 0);
    let (fired, out) = p.fire(expires);
    assert_eq!(fired, 1);
    assert!(out.events.is_empty() && out.calls.is_empty(), "{out:?}");
    assert!(
        out.notifications.is_empty(),
        "leaving the store is no status change"
    );
    assert!(p.stored().is_none(), "the payment is still in the store");
    assert_eq!(p.timers(), 0);

    // The changelog ends with the payment's tombstone; a restore from it holds nothing
    // of the payment, though every earlier batch had it.
    let batches: Vec<_> = p
        .task
        .pending_changelog()
        .expect("changelog")
        .into_iter()
        .flat_map(|(_, records)| records)
        .collect();
    let state_key = |k: &[u8]| stores::store_of(k) == Some("payments");
    let last_state_write = batches
        .iter()
        .rev()
        .find(|(k, _)| state_key(k))
        .expect("the payment's records");
    assert_eq!(
        last_state_write.1, None,
        "the last write of the payment is a tombstone"
    );
    let restore_from = |records: &[stores::ChangelogRecord]| {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = PartitionStore::open(dir.path(), "app", TOPIC, 0).expect("store");
        let mut restore = stores::Restore::start(&store).expect("restore");
        for r in records {
            restore.push(r.clone()).expect("push");
        }
        restore.finish(0).expect("finish");
        let held = store
            .get_raw("payments", &p.payment_id.key_bytes())
            .expect("read")
            .is_some();
        let timers = store.scan(TIMERS, usize::MAX).expect("timers").len();
        (held, timers)
    };
    assert_eq!(restore_from(&batches), (false, 0));
    let before_expiry = batches
        .iter()
        .rposition(|(k, v)| state_key(k) && v.is_some())
        .expect("a put of the payment");
    let until_marker = batches[before_expiry..]
        .iter()
        .position(|(k, _)| stores::is_commit_marker(k))
        .expect("a commit marker")
        + before_expiry;
    assert_eq!(restore_from(&batches[..=until_marker]), (true, 1));
}

#[test]
fn a_create_older_than_the_retention_is_dead_lettered_and_charges_nothing() {
    let mut p = Partition::new();
    let out = p.create(T0, T0 + RETENTION + 1);
    assert!(out.calls.is_empty() && out.events.is_empty(), "{out:?}");
    assert_eq!(out.dead_letters.len(), 1);
    let dl = &out.dead_letters[0];
    assert_eq!((dl.reason.as_str(), dl.source_offset), ("expired", 0));
    assert_eq!(dl.key.as_deref(), Some(p.payment_id.to_string().as_str()));
    assert!(
        dl.detail.contains("older than the state retention"),
        "{dl:?}"
    );
    assert!(p.stored().is_none());

    // Within the retention, the same create is applied.
    let mut p = Partition::new();
    let out = p.create(T0, T0 + RETENTION - 1);
    assert_eq!(out.calls, vec![ProviderOp::Charge]);
}

#[test]
fn nothing_that_arrives_after_a_payment_expired_acts_on_it() {
    let mut p = Partition::completed();
    let expires = T0 + 100 + RETENTION;
    p.fire(expires);
    assert!(p.stored().is_none());
    let late = expires + 1_000;
    let body = p.create_body();
    let replays = [
        ("create-1", T0, body),
        (
            "reply-late",
            late,
            CommandBody::ProviderReply {
                op: ProviderOp::Charge,
                attempt: 1,
                outcome: ProviderOutcome::Approved {
                    provider_ref: "ch_1".into(),
                },
            },
        ),
        (
            "webhook-late",
            late,
            CommandBody::Webhook {
                webhook_id: "wh-late".into(),
                outcome: WebhookOutcome::Failed {
                    code: "card_declined".into(),
                    message: "declined".into(),
                },
            },
        ),
        (
            "cancel-late",
            late,
            CommandBody::Cancel {
                merchant_id: p.merchant.clone(),
            },
        ),
    ];
    for (id, issued, body) in replays {
        let out = p.send(id, issued, body, late);
        assert!(
            out.calls.is_empty() && out.events.is_empty(),
            "{id} acted on an expired payment: {out:?}"
        );
        assert!(p.stored().is_none(), "{id} brought the payment back");
        assert_eq!(p.timers(), 0, "{id} set a timer");
        let expected_dead_letters = usize::from(id == "create-1");
        assert_eq!(
            out.dead_letters.len(),
            expected_dead_letters,
            "{id}: {out:?}"
        );
    }
}

#[test]
fn payments_kept_in_the_previous_encoding_are_rewritten_and_expire() {
    let mut p = Partition::completed();
    // What a store from before retention holds: the bare state, no expiry timer.
    let state = p.stored().expect("the payment").state;
    let mut ws = stores::WriteSet::default();
    ws.put_raw(
        "payments",
        &p.payment_id.key_bytes(),
        stores::encode(&state),
    );
    for (k, _) in p.task.store().scan(TIMERS, usize::MAX).expect("timers") {
        ws.delete(TIMERS, &k);
    }
    p.task.store().commit(ws).expect("commit");
    assert_eq!(p.timers(), 0);
    let bytes = |p: &Partition| {
        p.task
            .store()
            .get_raw("payments", &p.payment_id.key_bytes())
            .expect("read")
            .expect("the payment")
    };
    assert!(!stored::is_current(&bytes(&p)));

    let now = T0 + DAY;
    p.task.maintain(now).expect("housekeeping");
    assert!(stored::is_current(&bytes(&p)), "not rewritten");
    assert_eq!(
        p.stored().and_then(|s| s.expires_at_ms),
        Some(now + RETENTION)
    );
    assert_eq!(p.timers(), 1);
    let (fired, _) = p.fire(now + RETENTION);
    assert_eq!(fired, 1);
    assert!(p.stored().is_none(), "the upgraded payment did not expire");
}
