//! # simulator — a stand-in for an external payment service provider (PSP)
//!
//! Endpoints (JSON):
//! - `POST /v1/charges` `{idempotency_key, amount, currency, reference}` — charge. The same
//!   idempotency key always names the same charge: a repeat returns the stored result.
//! - `GET /v1/charges/{key}` — status (404 when no charge exists under the key).
//! - `POST /v1/charges/{key}/cancel` — cancel a pending charge (or void an unknown key);
//!   409 for a captured or declined one.
//! - `POST /v1/refunds` `{idempotency_key, charge_key, amount, currency, reference, refund}`
//!   (header `Idempotency-Key`) — refund (part of) a captured charge; see [`refunds`] for
//!   the answers. The same key always names the same refund.
//! - `GET /v1/refunds/{key}` — refund status (404 when no refund exists under the key).
//! - `GET /ledger` — every charge with its capture count and every refund with its
//!   refund count: tests check "charged at most once" and "refunded at most once".
//! - `GET /health`.
//!
//! Outcomes come from **magic amounts** (the last two digits of the minor units, see
//! [`Behaviour::for_amount`]; for a refund, of the refunded amount) or, for other amounts,
//! from the configured rates. Async outcomes are delivered as Standard-Webhooks-signed
//! webhooks (`charge.*`, `refund.*`), optionally duplicated and delayed out of order.

pub mod refunds;

pub use refunds::{Refund, RefundStatus};

use payments::retry::Backoff;
use payments::webhook;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warp::http::StatusCode;
use warp::{Filter, Reply};

/// Knobs. Rates are probabilities in `[0, 1]` applied to non-magic amounts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    pub min_latency_ms: u64,
    pub max_latency_ms: u64,
    pub decline_rate: f64,
    pub error_rate: f64,
    pub timeout_rate: f64,
    pub lost_response_rate: f64,
    pub async_rate: f64,
    /// How long a "timeout" request hangs before answering (beyond the client's patience).
    pub hang_ms: u64,
    pub webhook_url: Option<String>,
    /// `whsec_...`; webhooks are signed with it.
    pub webhook_secret: String,
    pub webhook_delay_ms: u64,
    pub duplicate_webhook_rate: f64,
    /// Extra random delay (0..=this) per webhook, which reorders deliveries.
    pub webhook_jitter_ms: u64,
    pub magic_amounts: bool,
    pub seed: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            min_latency_ms: 0,
            max_latency_ms: 0,
            decline_rate: 0.0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            lost_response_rate: 0.0,
            async_rate: 0.0,
            hang_ms: 5_000,
            webhook_url: None,
            webhook_secret: "whsec_c2ltdWxhdG9yLXdlYmhvb2stc2VjcmV0".into(),
            webhook_delay_ms: 50,
            duplicate_webhook_rate: 0.0,
            webhook_jitter_ms: 0,
            magic_amounts: true,
            seed: None,
        }
    }
}

impl SimConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v) in [
            ("decline_rate", self.decline_rate),
            ("error_rate", self.error_rate),
            ("timeout_rate", self.timeout_rate),
            ("lost_response_rate", self.lost_response_rate),
            ("async_rate", self.async_rate),
            ("duplicate_webhook_rate", self.duplicate_webhook_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                p.push(format!("{name} must be between 0 and 1 (got {v})"));
            }
        }
        if self.min_latency_ms > self.max_latency_ms {
            p.push("min_latency_ms must not exceed max_latency_ms".into());
        }
        if webhook::secret_bytes(&self.webhook_secret).is_err() {
            p.push("webhook_secret must be whsec_ followed by base64".into());
        }
        p
    }
}

/// What the simulator does with a new charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Approve,
    Decline,
    /// 503 without charging, on the first attempt only; later attempts approve.
    ErrorOnce,
    /// 503 on every attempt: the provider is down for this payment.
    ErrorAlways,
    /// Charges, then hangs past the client's timeout (first attempt only).
    TimeoutOnce,
    /// Charges, then answers 500: the response is lost (first attempt only).
    LostResponseOnce,
    /// 202 pending, then a webhook with the outcome.
    AsyncSucceed,
    AsyncFail,
    /// Like `AsyncSucceed` but the webhook comes ten times later (time to cancel).
    AsyncSlow,
    /// The webhook is sent before the synchronous 202 answer, and twice.
    AsyncWebhookFirst,
    /// 503 on the first attempt; the retry is answered pending, then a webhook
    /// `charge.succeeded`.
    ErrorOnceThenAsync,
}

impl Behaviour {
    /// Magic amounts: the last two digits of the amount in minor units.
    ///
    /// | ends in | outcome |
    /// |---|---|
    /// | 01 | declined (`card_declined`) |
    /// | 02 | 503 on the first attempt, then approved |
    /// | 03 | pending, webhook `charge.succeeded` |
    /// | 04 | pending, webhook `charge.failed` (`insufficient_funds`) |
    /// | 05 | first attempt hangs past the client timeout (charge made) |
    /// | 06 | first attempt charges but answers 500 (response lost) |
    /// | 07 | pending, slow webhook (a window to cancel) |
    /// | 08 | 503 on every attempt |
    /// | 09 | webhook before the synchronous answer, delivered twice |
    /// | 10 | 503 on the first attempt, then pending and webhook `charge.succeeded` |
    /// | other | the configured rates (default: approved) |
    ///
    /// Refunds read the same table on the refunded amount, with "declined" meaning the
    /// refund is refused (`refund_declined`) and the webhooks being `refund.*`.
    pub fn for_amount(amount: i64) -> Option<Behaviour> {
        Some(match amount % 100 {
            1 => Behaviour::Decline,
            2 => Behaviour::ErrorOnce,
            3 => Behaviour::AsyncSucceed,
            4 => Behaviour::AsyncFail,
            5 => Behaviour::TimeoutOnce,
            6 => Behaviour::LostResponseOnce,
            7 => Behaviour::AsyncSlow,
            8 => Behaviour::ErrorAlways,
            9 => Behaviour::AsyncWebhookFirst,
            10 => Behaviour::ErrorOnceThenAsync,
            _ => return None,
        })
    }

    /// What this behaviour does to one attempt (`first`: the key's first request). The
    /// same for charges and refunds, so both fail in the same ways under the same knobs.
    fn outcome(self, first: bool) -> Outcome {
        match self {
            Behaviour::ErrorAlways => Outcome::Unavailable { always: true },
            Behaviour::ErrorOnce | Behaviour::ErrorOnceThenAsync if first => {
                Outcome::Unavailable { always: false }
            }
            Behaviour::Decline => Outcome::Declined,
            Behaviour::TimeoutOnce if first => Outcome::Done {
                hang: true,
                lost: false,
            },
            Behaviour::LostResponseOnce if first => Outcome::Done {
                hang: false,
                lost: true,
            },
            Behaviour::AsyncSucceed
            | Behaviour::AsyncFail
            | Behaviour::AsyncSlow
            | Behaviour::AsyncWebhookFirst
            | Behaviour::ErrorOnceThenAsync => Outcome::Pending,
            _ => Outcome::Done {
                hang: false,
                lost: false,
            },
        }
    }

    /// How an operation this behaviour left pending is settled; `None` when it does not
    /// go pending.
    fn settlement(self, webhook_delay_ms: u64) -> Option<Settlement> {
        let (succeed, delay_ms, webhook_first) = match self {
            Behaviour::AsyncSucceed | Behaviour::ErrorOnceThenAsync => {
                (true, webhook_delay_ms, false)
            }
            Behaviour::AsyncFail => (false, webhook_delay_ms, false),
            Behaviour::AsyncSlow => (
                true,
                webhook_delay_ms.saturating_mul(10).saturating_add(500),
                false,
            ),
            Behaviour::AsyncWebhookFirst => (true, 0, true),
            _ => return None,
        };
        Some(Settlement {
            succeed,
            delay_ms,
            webhook_first,
        })
    }
}

/// One attempt's fate under a [`Behaviour`], before it is applied to a charge or a refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// 503 and nothing done: on every attempt (`always`) or on this one only.
    Unavailable { always: bool },
    /// Refused by the provider: final, nothing moved.
    Declined,
    /// Money moved; then the answer hangs past the client's timeout (`hang`) or is
    /// replaced by a 500 (`lost`), so the client cannot tell it moved.
    Done { hang: bool, lost: bool },
    /// 202 now, the outcome later by webhook (see [`Settlement`]).
    Pending,
}

impl Outcome {
    /// The fault answered instead of the operation's own answer, if any.
    fn fault(self) -> Option<Answer> {
        match self {
            Outcome::Unavailable { always: true } => Some(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "provider unavailable",
            )),
            Outcome::Unavailable { always: false } => Some(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "try again",
            )),
            Outcome::Done { lost: true, .. } => Some(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "response lost",
            )),
            _ => None,
        }
    }

    fn hangs(self) -> bool {
        matches!(self, Outcome::Done { hang: true, .. })
    }
}

/// When and how a pending charge or refund is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settlement {
    succeed: bool,
    delay_ms: u64,
    /// The webhook goes out (twice) before the synchronous 202 answer.
    webhook_first: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    Pending,
    Succeeded,
    Declined,
    Canceled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: String,
    pub idempotency_key: String,
    pub amount: i64,
    pub currency: String,
    pub reference: String,
    pub status: ChargeStatus,
    pub code: Option<String>,
    pub message: Option<String>,
    /// Times money was captured for this key: must never exceed 1.
    pub captures: u32,
    pub requests: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ledger {
    pub charges: Vec<Charge>,
    pub total_captures: u64,
    pub requests: u64,
    pub webhooks_sent: u64,
    /// Faults injected: 5xx answers, hangs past the client's timeout, lost answers,
    /// duplicated or delayed webhooks.
    #[serde(default)]
    pub faults: u64,
    /// Every refund, with how many times it returned money (`refunds_made`, at most 1).
    #[serde(default)]
    pub refunds: Vec<Refund>,
}

struct Inner {
    charges: HashMap<String, Charge>,
    /// Requests seen per key, including those that created no charge (for `*Once`).
    attempts: HashMap<String, u32>,
    /// Refunds by their own idempotency key (a namespace apart from charge keys).
    refunds: HashMap<String, Refund>,
    /// Refund keys per charge key: what the over-refund check sums.
    refunds_by_charge: HashMap<String, Vec<String>>,
    /// Requests seen per refund key, including those that made no refund (for `*Once`).
    refund_attempts: HashMap<String, u32>,
    rng: StdRng,
    requests: u64,
    webhooks_sent: u64,
    faults: u64,
}

#[derive(Clone)]
pub struct Simulator {
    cfg: Arc<SimConfig>,
    inner: Arc<Mutex<Inner>>,
    http: reqwest::Client,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeRequest {
    idempotency_key: String,
    amount: i64,
    currency: String,
    #[serde(default)]
    reference: String,
}

/// An answer: status code and JSON body.
type Answer = (StatusCode, serde_json::Value);

fn body_of(c: &Charge) -> serde_json::Value {
    serde_json::json!({
        "charge_id": c.charge_id,
        "status": c.status,
        "code": c.code,
        "message": c.message,
        "amount": c.amount,
        "currency": c.currency,
    })
}

/// A charge webhook's `data`.
fn charge_event(c: &Charge) -> serde_json::Value {
    serde_json::json!({
        "charge_id": c.charge_id,
        "idempotency_key": c.idempotency_key,
        "reference": c.reference,
        "status": c.status,
        "code": c.code,
        "message": c.message,
    })
}

fn error(status: StatusCode, code: &str, message: &str) -> Answer {
    (
        status,
        serde_json::json!({ "status": "error", "code": code, "message": message }),
    )
}

impl Simulator {
    pub fn new(cfg: SimConfig) -> Self {
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => rand::make_rng(),
        };
        Simulator {
            cfg: Arc::new(cfg),
            inner: Arc::new(Mutex::new(Inner {
                charges: HashMap::new(),
                attempts: HashMap::new(),
                refunds: HashMap::new(),
                refunds_by_charge: HashMap::new(),
                refund_attempts: HashMap::new(),
                rng,
                requests: 0,
                webhooks_sent: 0,
                faults: 0,
            })),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another request panicked; the map is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ledger(&self) -> Ledger {
        let g = self.lock();
        let mut charges: Vec<Charge> = g.charges.values().cloned().collect();
        charges.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
        let mut refunds: Vec<Refund> = g.refunds.values().cloned().collect();
        refunds.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
        Ledger {
            total_captures: charges.iter().map(|c| u64::from(c.captures)).sum(),
            charges,
            requests: g.requests,
            webhooks_sent: g.webhooks_sent,
            faults: g.faults,
            refunds,
        }
    }

    async fn latency(&self) {
        let (lo, hi) = (self.cfg.min_latency_ms, self.cfg.max_latency_ms);
        if hi == 0 {
            return;
        }
        let ms = self.lock().rng.random_range(lo..=hi);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// A behaviour from the configured rates. `declines`: whether `decline_rate` applies;
    /// refunds pass `false`, since a card decline is a charge's business outcome, not a
    /// fault, and the rates' other faults then keep exactly their configured odds.
    fn pick_random(&self, g: &mut Inner, declines: bool) -> Behaviour {
        let c = &self.cfg;
        let r: f64 = g.rng.random();
        let mut edge = 0.0;
        let decline_rate = if declines { c.decline_rate } else { 0.0 };
        for (rate, b) in [
            (decline_rate, Behaviour::Decline),
            (c.error_rate, Behaviour::ErrorOnce),
            (c.timeout_rate, Behaviour::TimeoutOnce),
            (c.lost_response_rate, Behaviour::LostResponseOnce),
            (c.async_rate, Behaviour::AsyncSucceed),
        ] {
            edge += rate;
            if r < edge {
                return b;
            }
        }
        Behaviour::Approve
    }

    async fn charge(&self, req: ChargeRequest) -> Answer {
        self.latency().await;
        if req.amount <= 0 || req.idempotency_key.is_empty() || req.currency.len() != 3 {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "amount > 0, idempotency_key and a 3-letter currency are required",
            );
        }
        let (answer, settlement, hang) = {
            let mut g = self.lock();
            g.requests += 1;
            let attempt = {
                let a = g.attempts.entry(req.idempotency_key.clone()).or_insert(0);
                *a += 1;
                *a
            };
            if let Some(c) = g.charges.get_mut(&req.idempotency_key) {
                // Idempotency: the same key is the same charge, whatever the attempt.
                c.requests += 1;
                return (StatusCode::OK, body_of(c));
            }
            let magic = if self.cfg.magic_amounts {
                Behaviour::for_amount(req.amount)
            } else {
                None
            };
            let behaviour = match magic {
                Some(b) => b,
                None => self.pick_random(&mut g, true),
            };
            let outcome = behaviour.outcome(attempt == 1);
            let new_charge =
                |status: ChargeStatus, code: Option<&str>, message: Option<&str>| Charge {
                    charge_id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
                    idempotency_key: req.idempotency_key.clone(),
                    amount: req.amount,
                    currency: req.currency.clone(),
                    reference: req.reference.clone(),
                    status,
                    code: code.map(str::to_owned),
                    message: message.map(str::to_owned),
                    captures: u32::from(status == ChargeStatus::Succeeded),
                    requests: 1,
                };
            let charge = match outcome {
                Outcome::Unavailable { .. } => None,
                Outcome::Declined => Some(new_charge(
                    ChargeStatus::Declined,
                    Some("card_declined"),
                    Some("the card was declined"),
                )),
                Outcome::Done { .. } => Some(new_charge(ChargeStatus::Succeeded, None, None)),
                Outcome::Pending => Some(new_charge(ChargeStatus::Pending, None, None)),
            };
            let answer = match (outcome.fault(), &charge) {
                (Some(fault), _) => fault,
                (None, Some(c)) if c.status == ChargeStatus::Pending => {
                    (StatusCode::ACCEPTED, body_of(c))
                }
                (None, Some(c)) => (StatusCode::OK, body_of(c)),
                // Unreachable: only `Unavailable` makes no charge, and it is a fault.
                (None, None) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no charge"),
            };
            let hang = outcome.hangs();
            if hang || answer.0.is_server_error() {
                g.faults += 1;
            }
            if let Some(c) = charge {
                g.charges.insert(c.idempotency_key.clone(), c);
            }
            let settlement = match outcome {
                Outcome::Pending => behaviour.settlement(self.cfg.webhook_delay_ms),
                _ => None,
            };
            (answer, settlement, hang)
        };
        if let Some(s) = settlement {
            self.settle_charge_later(req.idempotency_key.clone(), s);
        }
        self.deliver_answer(answer, settlement, hang).await
    }

    /// Answers a charge or refund attempt as its behaviour says: after its webhook when
    /// the webhook comes first, after the client gave up when it hangs.
    async fn deliver_answer(
        &self,
        answer: Answer,
        settlement: Option<Settlement>,
        hang: bool,
    ) -> Answer {
        if settlement.is_some_and(|s| s.webhook_first) {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        if hang {
            tokio::time::sleep(Duration::from_millis(self.cfg.hang_ms)).await;
        }
        answer
    }

    /// Resolves a pending charge after the settlement's delay and sends its webhook
    /// (unless it was canceled meanwhile, in which case `charge.canceled` is sent).
    fn settle_charge_later(&self, key: String, s: Settlement) {
        self.settle_later(s.delay_ms, s.webhook_first, move |g| {
            let c = g.charges.get_mut(&key)?;
            let kind = match c.status {
                ChargeStatus::Pending if s.succeed => {
                    c.status = ChargeStatus::Succeeded;
                    c.captures += 1;
                    "charge.succeeded"
                }
                ChargeStatus::Pending => {
                    c.status = ChargeStatus::Declined;
                    c.code = Some("insufficient_funds".into());
                    c.message = Some("insufficient funds".into());
                    "charge.failed"
                }
                ChargeStatus::Canceled => "charge.canceled",
                _ => return None,
            };
            Some((kind, charge_event(c)))
        });
    }

    /// After `delay_ms`, runs `settle` under the lock (it moves the pending state on and
    /// names the webhook to send, or `None` for nothing), then sends that webhook (twice
    /// when `twice`). Shared by charges and refunds so both settle, and fail to, alike.
    fn settle_later<F>(&self, delay_ms: u64, twice: bool, settle: F)
    where
        F: FnOnce(&mut Inner) -> Option<(&'static str, serde_json::Value)> + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let event = settle(&mut this.lock());
            if let Some((kind, data)) = event {
                this.send_webhook(kind, data, twice).await;
            }
        });
    }

    /// Sends `{"type": kind, "data": data}`, Standard-Webhooks-signed, with the configured
    /// duplication and jitter, retrying each delivery until the receiver answers 2xx.
    async fn send_webhook(&self, kind: &str, data: serde_json::Value, twice: bool) {
        let Some(url) = self.cfg.webhook_url.clone() else {
            return;
        };
        let Ok(secret) = webhook::secret_bytes(&self.cfg.webhook_secret) else {
            return;
        };
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let body = serde_json::to_vec(&serde_json::json!({ "type": kind, "data": data }))
            .unwrap_or_default();
        let (duplicate, jitter) = {
            let mut g = self.lock();
            let dup = twice || g.rng.random::<f64>() < self.cfg.duplicate_webhook_rate;
            let jitter = if self.cfg.webhook_jitter_ms > 0 {
                g.rng.random_range(0..=self.cfg.webhook_jitter_ms)
            } else {
                0
            };
            g.faults += u64::from(dup) + u64::from(jitter > 0);
            (dup, jitter)
        };
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        for _ in 0..if duplicate { 2 } else { 1 } {
            // Retries with back-off until the receiver answers 2xx, like real providers.
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            for _ in 0..8 {
                let ts = now_secs();
                let res = self
                    .http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", webhook::sign(&secret, &id, ts, &body))
                    .body(body.clone())
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        self.lock().webhooks_sent += 1;
                        break;
                    }
                    Ok(r) => tracing::debug!(status = %r.status(), "webhook refused; retrying"),
                    Err(e) => tracing::debug!(error = %e, "webhook delivery failed; retrying"),
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }

    async fn status(&self, key: String) -> Answer {
        self.latency().await;
        let mut g = self.lock();
        g.requests += 1;
        match g.charges.get(&key) {
            Some(c) => (StatusCode::OK, body_of(c)),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no charge under this idempotency key",
            ),
        }
    }

    async fn cancel(&self, key: String) -> Answer {
        self.latency().await;
        let mut g = self.lock();
        g.requests += 1;
        match g.charges.get_mut(&key) {
            Some(c) if c.status == ChargeStatus::Pending || c.status == ChargeStatus::Canceled => {
                c.status = ChargeStatus::Canceled;
                (StatusCode::OK, body_of(c))
            }
            Some(c) => {
                let mut b = body_of(c);
                b["message"] =
                    serde_json::json!(
                        format!("charge is {:?}; it cannot be canceled", c.status).to_lowercase()
                    );
                (StatusCode::CONFLICT, b)
            }
            None => {
                // Void the key: a charge arriving later under it is refused.
                let c = Charge {
                    charge_id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
                    idempotency_key: key.clone(),
                    amount: 0,
                    currency: String::new(),
                    reference: String::new(),
                    status: ChargeStatus::Canceled,
                    code: Some("voided".into()),
                    message: Some("voided before any charge".into()),
                    captures: 0,
                    requests: 0,
                };
                let body = body_of(&c);
                g.charges.insert(key, c);
                (StatusCode::OK, body)
            }
        }
    }

    /// The HTTP routes.
    pub fn routes(
        &self,
    ) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone
    {
        let sim = self.clone();
        let with = move || {
            let s = sim.clone();
            warp::any().map(move || s.clone())
        };
        let reply = |(status, body): Answer| {
            warp::reply::with_status(warp::reply::json(&body), status).into_response()
        };
        let charge = warp::path!("v1" / "charges")
            .and(warp::post())
            .and(warp::body::content_length_limit(16 * 1024))
            .and(warp::body::json())
            .and(with())
            .then(
                move |req: ChargeRequest, s: Simulator| async move { reply(s.charge(req).await) },
            );
        let status = warp::path!("v1" / "charges" / String)
            .and(warp::get())
            .and(with())
            .then(move |key: String, s: Simulator| async move { reply(s.status(key).await) });
        let cancel = warp::path!("v1" / "charges" / String / "cancel")
            .and(warp::post())
            .and(with())
            .then(move |key: String, s: Simulator| async move { reply(s.cancel(key).await) });
        let refund = warp::path!("v1" / "refunds")
            .and(warp::post())
            .and(warp::header::optional::<String>("idempotency-key"))
            .and(warp::body::content_length_limit(16 * 1024))
            .and(warp::body::json())
            .and(with())
            .then(
                move |key: Option<String>, req: refunds::RefundRequest, s: Simulator| async move {
                    reply(s.refund(key, req).await)
                },
            );
        let refund_status = warp::path!("v1" / "refunds" / String)
            .and(warp::get())
            .and(with())
            .then(
                move |key: String, s: Simulator| async move { reply(s.refund_status(key).await) },
            );
        let ledger = warp::path!("ledger")
            .and(warp::get())
            .and(with())
            .map(|s: Simulator| warp::reply::json(&s.ledger()).into_response());
        let health = warp::path!("health")
            .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response());
        charge
            .or(status)
            .unify()
            .or(cancel)
            .unify()
            .or(refund)
            .unify()
            .or(refund_status)
            .unify()
            .or(ledger)
            .unify()
            .or(health)
            .unify()
            .recover(move |r: warp::Rejection| async move {
                let (status, msg) = if r.is_not_found() {
                    (StatusCode::NOT_FOUND, "no such route".to_owned())
                } else if let Some(e) = r.find::<warp::filters::body::BodyDeserializeError>() {
                    (StatusCode::BAD_REQUEST, e.to_string())
                } else {
                    (StatusCode::BAD_REQUEST, format!("{r:?}"))
                };
                Ok::<_, std::convert::Infallible>(reply(error(status, "invalid_request", &msg)))
            })
            .unify()
    }
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
