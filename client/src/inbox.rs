//! The demo merchant endpoint: what a merchant runs to receive the gateway's
//! notifications (README, Merchant notifications).
//!
//! It owns two things: the check of every delivery's Standard Webhooks signature against
//! the configured secrets (several while one is rotated; `payments::webhook` does the
//! cryptography, never this module), and a bounded in-memory list of the verified
//! notifications, deduplicated by `webhook-id`. It must never store, nor answer 2xx to, a
//! delivery whose signature does not verify: a 2xx tells the notifier it arrived.
//!
//! `POST /notify` receives; `GET /notifications` lists, newest first. `payctl listen`
//! serves these two routes alone, `payctl ui` beside its page (the same filter).

use bytes::Bytes;
use payments::webhook::{self, WebhookError};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

/// Notifications kept by default; past that, the oldest go first.
pub const DEFAULT_KEEP: usize = 500;
/// A notification is a payment or a refund as the API returns it, a few KiB at most;
/// a body far larger is not one, and is not read.
const MAX_BODY_BYTES: u64 = 256 * 1024;

/// A secret given to `payctl` that the gateway cannot have signed with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("no notification secret: give --secret whsec_… (or PAYCTL_NOTIFY_SECRETS), the merchant's notify_secrets entry in config/merchants.toml")]
    Missing,
    /// Its position among the secrets given (from 1); the secret itself is never shown.
    #[error("notification secret #{0} (--secret / PAYCTL_NOTIFY_SECRETS) is not `whsec_` followed by base64: copy it from the merchant's notify_secrets in config/merchants.toml")]
    Malformed(usize),
}

/// The secrets a delivery may be signed with (raw key bytes): at least one.
#[derive(Clone)]
pub struct Secrets(Arc<Vec<Vec<u8>>>);

impl Secrets {
    /// `whsec_…` secrets, as the merchant's `notify_secrets` lists them. Blank entries (a
    /// trailing comma in the variable) are skipped.
    pub fn parse<S: AsRef<str>>(given: &[S]) -> Result<Secrets, SecretError> {
        let mut keys = Vec::new();
        for (i, s) in given.iter().enumerate() {
            let s = s.as_ref().trim();
            if s.is_empty() {
                continue;
            }
            match webhook::secret_bytes(s) {
                Ok(key) if !key.is_empty() => keys.push(key),
                _ => return Err(SecretError::Malformed(i + 1)),
            }
        }
        if keys.is_empty() {
            return Err(SecretError::Missing);
        }
        Ok(Secrets(Arc::new(keys)))
    }
}

impl std::fmt::Debug for Secrets {
    // Never the key bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} keys)", self.0.len())
    }
}

/// One notification received with a valid signature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    /// `webhook-id`: the same for every delivery of one notification.
    pub webhook_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub payment_id: String,
    /// The payment's event number: orders what arrives out of order.
    pub seq: u64,
    /// The status the payment, or for `refund.*` the refund, reached.
    pub status: String,
    /// For `refund.*`: the refund.
    pub refund_id: Option<String>,
    /// The payment's, or the refund's, amount (minor units) and currency.
    pub amount: Option<i64>,
    pub currency: Option<String>,
    /// When the first delivery arrived.
    pub received_at: String,
    /// Deliveries of this notification received: a redelivery is counted, not shown again.
    pub deliveries: u32,
    pub body: Value,
}

impl Notice {
    /// One line: when, type, payment, seq, status (and the refund, for a refund's).
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}  {:<18}  {}  seq={:<3}  {}",
            self.received_at, self.kind, self.payment_id, self.seq, self.status
        );
        if let Some(r) = &self.refund_id {
            line.push_str(&format!("  {r}"));
        }
        if let Some(a) = self.amount {
            line.push_str(&format!(
                "  {a} {}",
                self.currency.as_deref().unwrap_or_default()
            ));
        }
        line
    }
}

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}: the delivery is not signed with any of the secrets given here (the merchant's notify_secrets)")]
    Signature(#[from] WebhookError),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the body is not a gateway notification: {0}")]
    NotNotification(&'static str),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Signature(_) => StatusCode::UNAUTHORIZED,
            Refusal::NotJson(_) | Refusal::NotNotification(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The API's codes for the same refusals of a provider's webhook.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Signature(_) => "invalid_signature",
            Refusal::NotJson(_) | Refusal::NotNotification(_) => "invalid_webhook",
        }
    }
}

/// What happened to one delivery, for whoever watches (`payctl listen` prints it).
pub enum Outcome<'a> {
    Stored(&'a Notice),
    /// A delivery of a notification already kept (its `deliveries` counts this one).
    Redelivered(&'a Notice),
    Refused(&'a Refusal),
}

type Observer = Arc<dyn Fn(&Outcome<'_>) + Send + Sync>;

#[derive(Default)]
struct Store {
    /// Oldest first; at most `keep`.
    kept: VecDeque<Notice>,
    keep: usize,
    /// Verified deliveries, redeliveries included.
    received: u64,
    redeliveries: u64,
    refused: u64,
}

/// The endpoint's state; clones share it.
#[derive(Clone)]
pub struct Inbox {
    secrets: Secrets,
    store: Arc<Mutex<Store>>,
    observer: Option<Observer>,
}

impl Inbox {
    /// Keeps the last `keep` (at least one) verified notifications.
    pub fn new(secrets: Secrets, keep: usize) -> Inbox {
        Inbox {
            secrets,
            store: Arc::new(Mutex::new(Store {
                keep: keep.max(1),
                ..Store::default()
            })),
            observer: None,
        }
    }

    /// Calls `f` with the outcome of every delivery.
    pub fn on_receive(mut self, f: impl Fn(&Outcome<'_>) + Send + Sync + 'static) -> Inbox {
        self.observer = Some(Arc::new(f));
        self
    }

    /// Verifies one delivery and keeps it (once per `webhook-id`); `now_ms` is the
    /// receiver's clock, which the signature's timestamp must be near.
    pub fn receive(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Notice, Refusal> {
        let checked = check(&self.secrets, headers, body, now_ms);
        let (result, redelivery) = {
            let mut store = self.lock();
            match checked {
                Ok(notice) => {
                    let (kept, redelivery) = store.record(notice);
                    (Ok(kept), redelivery)
                }
                Err(refusal) => {
                    store.refused += 1;
                    (Err(refusal), false)
                }
            }
        };
        if let Some(observe) = &self.observer {
            observe(&match &result {
                Ok(n) if redelivery => Outcome::Redelivered(n),
                Ok(n) => Outcome::Stored(n),
                Err(r) => Outcome::Refused(r),
            });
        }
        result
    }

    /// Kept notifications, newest first: of one payment, or all; at most `limit`.
    pub fn list(&self, payment_id: Option<&str>, limit: usize) -> Value {
        let store = self.lock();
        let data: Vec<&Notice> = store
            .kept
            .iter()
            .rev()
            .filter(|n| payment_id.is_none_or(|p| n.payment_id == p))
            .take(limit)
            .collect();
        json!({
            "data": data,
            "kept": store.kept.len(),
            "keep": store.keep,
            "received": store.received,
            "redeliveries": store.redeliveries,
            "refused": store.refused,
        })
    }

    /// `POST /notify` and `GET /notifications[?payment_id=…&limit=…]`.
    pub fn routes(&self) -> BoxedFilter<(Response,)> {
        let inbox = self.clone();
        let notify = warp::path!("notify").and(warp::post()).and(
            warp::body::content_length_limit(MAX_BODY_BYTES)
                .and(warp::header::headers_cloned())
                .and(warp::body::bytes())
                .map(move |headers: HeaderMap, body: Bytes| {
                    match inbox.receive(&headers, &body, now_ms()) {
                        Ok(n) => json_reply(
                            StatusCode::OK,
                            &json!({ "webhook_id": n.webhook_id, "deliveries": n.deliveries }),
                        ),
                        Err(r) => error_reply(r.status(), r.code(), &r.to_string()),
                    }
                })
                .recover(unreadable_body)
                .unify(),
        );
        let inbox = self.clone();
        let list = warp::path!("notifications")
            .and(warp::get())
            .and(warp::query::<HashMap<String, String>>())
            .map(move |q: HashMap<String, String>| {
                let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
                    None => usize::MAX,
                    Some(Ok(n)) if n >= 1 => n,
                    Some(_) => {
                        return error_reply(
                            StatusCode::BAD_REQUEST,
                            "invalid_request",
                            "limit must be a whole number from 1",
                        )
                    }
                };
                json_reply(
                    StatusCode::OK,
                    &inbox.list(q.get("payment_id").map(String::as_str), limit),
                )
            });
        notify.or(list).unify().boxed()
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic elsewhere cannot leave the list half-updated: each update is one push
        // or one counter; keep serving it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `/notify` and `/notifications` of a server started without secrets: 404, saying how
/// to switch them on.
pub fn disabled_routes() -> BoxedFilter<(Response,)> {
    warp::path!("notify")
        .or(warp::path!("notifications"))
        .unify()
        .map(|| {
            error_reply(
                StatusCode::NOT_FOUND,
                "notifications_off",
                "this server receives no notifications: start it with --secret whsec_… (or PAYCTL_NOTIFY_SECRETS), the merchant's notify_secrets entry, and point the merchant's notify_url at /notify here",
            )
        })
        .boxed()
}

impl Store {
    /// Keeps `n`, or counts it as a redelivery of the one kept under its id. Returns
    /// what is kept, and whether it was a redelivery.
    fn record(&mut self, n: Notice) -> (Notice, bool) {
        self.received += 1;
        if let Some(seen) = self.kept.iter_mut().find(|k| k.webhook_id == n.webhook_id) {
            seen.deliveries = seen.deliveries.saturating_add(1);
            self.redeliveries += 1;
            return (seen.clone(), true);
        }
        // Ids older than what is kept are forgotten with it: a redelivery after that
        // shows again (the list is a window, not a ledger).
        while self.kept.len() >= self.keep {
            self.kept.pop_front();
        }
        self.kept.push_back(n.clone());
        (n, false)
    }
}

/// Verifies the signature first (a forger learns nothing about the body), then reads
/// the notification.
fn check(
    secrets: &Secrets,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: i64,
) -> Result<Notice, Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    webhook::verify(
        &secrets.0,
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
        body,
        now_ms.div_euclid(1000),
    )?;
    // verify() refused a missing or empty id.
    let webhook_id = header("webhook-id").unwrap_or_default().to_owned();
    let body: Value = serde_json::from_slice(body).map_err(|e| Refusal::NotJson(e.to_string()))?;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let kind = text(&body["type"]).ok_or(Refusal::NotNotification("no `type`"))?;
    let payment_id =
        text(&body["payment_id"]).ok_or(Refusal::NotNotification("no `payment_id`"))?;
    let seq = body["seq"]
        .as_u64()
        .ok_or(Refusal::NotNotification("no `seq`"))?;
    let data = &body["data"];
    Ok(Notice {
        webhook_id,
        status: text(&data["status"]).unwrap_or_default(),
        refund_id: kind
            .starts_with("refund.")
            .then(|| text(&data["id"]))
            .flatten(),
        amount: data["amount"].as_i64(),
        currency: text(&data["currency"]),
        kind,
        payment_id,
        seq,
        received_at: payments::notify::iso_ms(now_ms),
        deliveries: 1,
        body,
    })
}

async fn unreadable_body(rejection: Rejection) -> Result<Response, Rejection> {
    Ok(
        if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
            error_reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is over 256 KiB: not a gateway notification",
            )
        } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
            error_reply(
                StatusCode::LENGTH_REQUIRED,
                "length_required",
                "send the body with a Content-Length",
            )
        } else {
            error_reply(
                StatusCode::BAD_REQUEST,
                "invalid_webhook",
                "the body could not be read",
            )
        },
    )
}

fn json_reply(status: StatusCode, body: &Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// The API's error shape: `{"error": {"code", "message"}}`.
fn error_reply(status: StatusCode, code: &str, message: &str) -> Response {
    json_reply(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_ZGVtby1tZXJjaGFudC1ub3RpZnktc2VjcmV0";
    const OTHER: &str = "whsec_b3RoZXItc2VjcmV0LW9mLWFub3RoZXI=";
    const PAY: &str = "pay_0123456789abcdef0123456789abcdef";

    fn inbox(keep: usize) -> Inbox {
        Inbox::new(Secrets::parse(&[SECRET]).unwrap(), keep)
    }

    fn notification(seq: u64, kind: &str, status: &str) -> String {
        json!({
            "id": format!("evt_0123456789abcdef0123456789abcdef_{seq}"),
            "type": kind, "payment_id": PAY, "seq": seq,
            "occurred_at": "2024-05-01T10:00:00.000Z",
            "data": { "id": PAY, "status": status, "amount": 1200, "currency": "EUR" },
        })
        .to_string()
    }

    /// POST /notify of `body` under `id`, signed now with `secret`.
    async fn deliver(
        routes: &BoxedFilter<(Response,)>,
        id: &str,
        body: &str,
        secret: &str,
    ) -> (u16, Value) {
        let ts = now_ms() / 1000;
        let key = webhook::secret_bytes(secret).unwrap();
        let res = warp::test::request()
            .method("POST")
            .path("/notify")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                webhook::sign(&key, id, ts, body.as_bytes()),
            )
            .body(body)
            .reply(routes)
            .await;
        (
            res.status().as_u16(),
            serde_json::from_slice(res.body()).unwrap(),
        )
    }

    async fn listed(routes: &BoxedFilter<(Response,)>, query: &str) -> Value {
        let res = warp::test::request()
            .path(&format!("/notifications{query}"))
            .reply(routes)
            .await;
        assert_eq!(res.status(), 200);
        serde_json::from_slice(res.body()).unwrap()
    }

    #[tokio::test]
    async fn a_validly_signed_notification_is_kept_and_listed() {
        let routes = inbox(10).routes();
        let body = notification(3, "payment.completed", "COMPLETED");
        let (status, answer) = deliver(&routes, "evt_a_3", &body, SECRET).await;
        assert_eq!(
            (status, &answer["deliveries"]),
            (200, &json!(1)),
            "{answer}"
        );
        let list = listed(&routes, "").await;
        let n = &list["data"][0];
        assert_eq!(
            (
                &n["webhook_id"],
                &n["type"],
                &n["payment_id"],
                &n["seq"],
                &n["status"]
            ),
            (
                &json!("evt_a_3"),
                &json!("payment.completed"),
                &json!(PAY),
                &json!(3),
                &json!("COMPLETED")
            )
        );
        assert_eq!(n["body"], serde_json::from_str::<Value>(&body).unwrap());
        assert_eq!(
            (&list["received"], &list["refused"]),
            (&json!(1), &json!(0))
        );
    }

    #[tokio::test]
    async fn any_of_the_rotating_secrets_verifies() {
        let both = Inbox::new(Secrets::parse(&[OTHER, SECRET]).unwrap(), 10).routes();
        let body = notification(1, "payment.created", "PROCESSING");
        assert_eq!(deliver(&both, "evt_a_1", &body, SECRET).await.0, 200);
        assert_eq!(deliver(&both, "evt_b_1", &body, OTHER).await.0, 200);
        assert_eq!(listed(&both, "").await["kept"], 2);
    }

    #[tokio::test]
    async fn a_forged_or_unsigned_delivery_is_refused_with_401_and_not_kept() {
        let routes = inbox(10).routes();
        let body = notification(3, "payment.completed", "COMPLETED");
        let (status, answer) = deliver(&routes, "evt_a_3", &body, OTHER).await;
        assert_eq!(status, 401);
        assert_eq!(answer["error"]["code"], "invalid_signature", "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no signature"),
            "{answer}"
        );
        let unsigned = warp::test::request()
            .method("POST")
            .path("/notify")
            .body(body.clone())
            .reply(&routes)
            .await;
        assert_eq!(unsigned.status(), 401);
        let answer: Value = serde_json::from_slice(unsigned.body()).unwrap();
        assert_eq!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .split(':')
                .next(),
            Some("missing header webhook-id")
        );
        let list = listed(&routes, "").await;
        assert_eq!((&list["kept"], &list["refused"]), (&json!(0), &json!(2)));
    }

    #[test]
    fn a_stale_signature_is_refused() {
        let inbox = inbox(10);
        let body = notification(3, "payment.completed", "COMPLETED");
        let key = webhook::secret_bytes(SECRET).unwrap();
        let ts = 1_700_000_000;
        let mut h = HeaderMap::new();
        h.insert("webhook-id", "evt_a_3".parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert(
            "webhook-signature",
            webhook::sign(&key, "evt_a_3", ts, body.as_bytes())
                .parse()
                .unwrap(),
        );
        let now_ms = (ts + 301) * 1000;
        assert_eq!(
            inbox.receive(&h, body.as_bytes(), now_ms),
            Err(Refusal::Signature(WebhookError::Stale))
        );
        assert!(inbox.receive(&h, body.as_bytes(), ts * 1000).is_ok());
    }

    #[tokio::test]
    async fn a_signed_body_that_is_no_notification_is_refused_with_400() {
        let routes = inbox(10).routes();
        let (status, answer) = deliver(&routes, "evt_x", "not json", SECRET).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_webhook"))
        );
        let (status, answer) =
            deliver(&routes, "evt_y", r#"{"type":"payment.completed"}"#, SECRET).await;
        assert_eq!(status, 400);
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("payment_id"),
            "{answer}"
        );
        assert_eq!(listed(&routes, "").await["kept"], 0);
    }

    #[tokio::test]
    async fn a_redelivery_is_shown_once_and_counted() {
        let routes = inbox(10).routes();
        let body = notification(7, "refund.succeeded", "SUCCEEDED");
        assert_eq!(deliver(&routes, "evt_a_7", &body, SECRET).await.0, 200);
        let (status, again) = deliver(&routes, "evt_a_7", &body, SECRET).await;
        assert_eq!((status, &again["deliveries"]), (200, &json!(2)));
        let list = listed(&routes, "").await;
        assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
        assert_eq!(list["data"][0]["deliveries"], 2);
        assert_eq!(
            list["data"][0]["refund_id"], PAY,
            "a refund's id is its data.id"
        );
        assert_eq!(
            (&list["received"], &list["redeliveries"]),
            (&json!(2), &json!(1))
        );
    }

    #[tokio::test]
    async fn only_the_newest_are_kept_newest_first() {
        let routes = inbox(3).routes();
        for seq in 1..=5 {
            let body = notification(seq, "payment.processing", "PROCESSING");
            assert_eq!(
                deliver(&routes, &format!("evt_a_{seq}"), &body, SECRET)
                    .await
                    .0,
                200
            );
        }
        let list = listed(&routes, "").await;
        let seqs: Vec<u64> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [5, 4, 3]);
        assert_eq!(
            (&list["kept"], &list["keep"], &list["received"]),
            (&json!(3), &json!(3), &json!(5))
        );
        let two = listed(&routes, "?limit=2").await;
        assert_eq!(two["data"].as_array().unwrap().len(), 2);
        let other = listed(&routes, "?payment_id=pay_other").await;
        assert_eq!(other["data"], json!([]));
        let bad = warp::test::request()
            .path("/notifications?limit=0")
            .reply(&routes)
            .await;
        assert_eq!(bad.status(), 400);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_unread() {
        let routes = inbox(10).routes();
        let res = warp::test::request()
            .method("POST")
            .path("/notify")
            .header("content-length", (MAX_BODY_BYTES + 1).to_string())
            .reply(&routes)
            .await;
        assert_eq!(res.status(), 413);
        let answer: Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(answer["error"]["code"], "payload_too_large");
    }

    #[tokio::test]
    async fn without_secrets_the_routes_say_how_to_switch_them_on() {
        let res = warp::test::request()
            .path("/notifications")
            .reply(&disabled_routes())
            .await;
        assert_eq!(res.status(), 404);
        let answer: Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(answer["error"]["code"], "notifications_off");
        assert!(answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--secret"));
    }

    #[test]
    fn secrets_are_parsed_without_showing_them() {
        assert_eq!(
            Secrets::parse::<&str>(&[]).unwrap_err(),
            SecretError::Missing
        );
        assert_eq!(
            Secrets::parse(&[" ", ""]).unwrap_err(),
            SecretError::Missing
        );
        assert_eq!(
            Secrets::parse(&[SECRET, "whsec_not base64!"]).unwrap_err(),
            SecretError::Malformed(2)
        );
        assert_eq!(
            Secrets::parse(&["whsec_"]).unwrap_err(),
            SecretError::Malformed(1)
        );
        let two = Secrets::parse(&[SECRET, " ", OTHER]).unwrap();
        assert_eq!(format!("{two:?}"), "Secrets(2 keys)");
        let msg = SecretError::Malformed(2).to_string();
        assert!(
            msg.contains("#2") && msg.contains("notify_secrets"),
            "{msg}"
        );
    }

    #[test]
    fn a_summary_names_type_payment_seq_status_and_the_refund() {
        let inbox = inbox(10);
        let body = json!({
            "type": "refund.succeeded", "payment_id": PAY, "seq": 9,
            "data": { "id": "re_1", "status": "SUCCEEDED", "amount": 500, "currency": "EUR" },
        })
        .to_string();
        let key = webhook::secret_bytes(SECRET).unwrap();
        let mut h = HeaderMap::new();
        h.insert("webhook-id", "evt_a_9".parse().unwrap());
        h.insert("webhook-timestamp", "1700000000".parse().unwrap());
        h.insert(
            "webhook-signature",
            webhook::sign(&key, "evt_a_9", 1_700_000_000, body.as_bytes())
                .parse()
                .unwrap(),
        );
        let n = inbox
            .receive(&h, body.as_bytes(), 1_700_000_000_000)
            .unwrap();
        assert_eq!(
            n.summary(),
            format!("2023-11-14T22:13:20.000Z  refund.succeeded    {PAY}  seq=9    SUCCEEDED  re_1  500 EUR")
        );
    }
}
