//! `/v1/payments`: create, list, read, read the history of, and cancel a payment.
//! Writes are commands ([`crate::commands::publish`]); reads come from the projection,
//! and, for a create this instance just accepted, from [`crate::recent`]: the payment,
//! its history and every list it belongs to answer at once on this instance.

use crate::commands::publish;
use crate::cursor;
use crate::error::{ApiError, ErrorCode};
use crate::recent::{Claim, RecentCreates};
use crate::request::{
    check_json_content_type, command_id, json, merchant, now_ms, parse_body, parse_id,
    reject_card_data, required_idempotency_key, Result,
};
use crate::ApiState;
use bytes::Bytes;
use payments::{
    Amount, Command, CommandBody, CreatePayment, Currency, IdempotencyKey, MerchantId, PaymentId,
    Status,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sinks::query::{ListFilter, PaymentView};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;
use warp::http::StatusCode;
use warp::reply::Response;

const MAX_REFERENCE: usize = 128;
const MAX_DESCRIPTION: usize = 512;
/// Metadata bounds: keys, key length (letters, digits, `_ - .`), value length.
pub const MAX_METADATA_KEYS: usize = 20;
pub const MAX_METADATA_KEY: usize = 40;
pub const MAX_METADATA_VALUE: usize = 200;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    amount: serde_json::Value,
    currency: String,
    #[serde(default)]
    reference: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// A validated create request and its canonical hash.
struct ValidCreate {
    amount: Amount,
    currency: Currency,
    reference: Option<String>,
    description: Option<String>,
    metadata: BTreeMap<String, String>,
    hash: String,
}

/// Metadata: at most [`MAX_METADATA_KEYS`] pairs; keys of 1 to [`MAX_METADATA_KEY`]
/// letters, digits, `_`, `-` or `.`; values of at most [`MAX_METADATA_VALUE`] characters
/// without control characters or card numbers.
fn validate_metadata(m: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    if m.len() > MAX_METADATA_KEYS {
        return Err(ApiError::invalid(format!(
            "metadata holds {} keys; at most {MAX_METADATA_KEYS} are allowed",
            m.len()
        )));
    }
    for (k, v) in &m {
        reject_card_data("metadata key", Some(k))?;
        let key_ok = !k.is_empty()
            && k.len() <= MAX_METADATA_KEY
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !key_ok {
            return Err(ApiError::invalid(format!(
                "metadata key {:?} must be 1 to {MAX_METADATA_KEY} letters, digits, '_', '-' or '.'",
                k.chars().take(MAX_METADATA_KEY + 1).collect::<String>()
            )));
        }
        if v.chars().count() > MAX_METADATA_VALUE || v.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "metadata.{k} must be at most {MAX_METADATA_VALUE} characters, without control characters"
            )));
        }
        reject_card_data(&format!("metadata.{k}"), Some(v))?;
    }
    Ok(m)
}

fn validate_create(req: CreateRequest) -> Result<ValidCreate> {
    let amount = req.amount.as_i64().ok_or_else(|| {
        ApiError::invalid("amount must be an integer number of minor units (e.g. 1050 for 10.50)")
    })?;
    let amount = Amount::new(amount).map_err(|e| ApiError::invalid(e.to_string()))?;
    let currency = Currency::parse(&req.currency).map_err(|e| ApiError::invalid(e.to_string()))?;
    let text = |name: &str, v: Option<String>, max: usize| -> Result<Option<String>> {
        match v {
            Some(s) if s.chars().count() > max => Err(ApiError::invalid(format!(
                "{name} must be at most {max} characters"
            ))),
            Some(s) if s.chars().any(char::is_control) => Err(ApiError::invalid(format!(
                "{name} must not contain control characters"
            ))),
            other => Ok(other),
        }
    };
    let reference = text("reference", req.reference, MAX_REFERENCE)?;
    let description = text("description", req.description, MAX_DESCRIPTION)?;
    for (name, v) in [("reference", &reference), ("description", &description)] {
        reject_card_data(name, v.as_deref())?;
    }
    let metadata = validate_metadata(req.metadata.unwrap_or_default())?;
    // The canonical form: field order and spelling fixed, so equal requests hash equally
    // (metadata, a sorted map, only when present).
    let mut canonical = serde_json::json!([
        amount.minor_units(),
        currency.as_str(),
        reference,
        description
    ]);
    if let (false, Some(fields)) = (metadata.is_empty(), canonical.as_array_mut()) {
        fields.push(serde_json::json!(metadata));
    }
    let hash = hex::encode(Sha256::digest(canonical.to_string().as_bytes()));
    Ok(ValidCreate {
        amount,
        currency,
        reference,
        description,
        metadata,
        hash,
    })
}

fn created_body(id: &PaymentId, v: &ValidCreate) -> serde_json::Value {
    serde_json::json!({
        "id": id.to_string(),
        "status": Status::New.as_str(),
        "amount": v.amount.minor_units(),
        "currency": v.currency.as_str(),
        "reference": v.reference,
        "metadata": v.metadata,
        "description": v.description,
        "links": { "self": format!("/v1/payments/{id}"), "events": format!("/v1/payments/{id}/events") },
    })
}

pub async fn create_payment(
    state: Arc<ApiState>,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    content_type: Option<String>,
    body: Result<Bytes>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    // Admission first, before any work: an overloaded API answers refusals cheaply.
    // Nothing has been claimed or queued, so a retry with the same key is a first attempt.
    let _in_flight = match &state.creates_in_flight {
        Some(permits) => Some(permits.try_acquire().map_err(|_| {
            crate::admission::Admission::refused_in_flight();
            ApiError::overloaded(1)
        })?),
        None => None,
    };
    // The key names the payment, and so the partition whose backlog admission reads.
    let key = required_idempotency_key(idempotency_key)?;
    let id = PaymentId::derive(&merchant, &key);
    if let Err(retry_after) = state.admission.admit(id.to_string().as_bytes()) {
        return Err(ApiError::overloaded(retry_after));
    }
    let body = body?;
    check_json_content_type(content_type.as_deref())?;
    let valid = validate_create(parse_body(&body)?)?;
    let body = created_body(&id, &valid);
    let conflict = || {
        ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was already used with a different request",
        )
    };
    let replay = |body: &serde_json::Value| {
        let mut r = json(StatusCode::ACCEPTED, body);
        r.headers_mut().insert(
            "idempotent-replayed",
            warp::http::HeaderValue::from_static("true"),
        );
        r
    };
    // A key already used: replay or refuse, from the projection or recent memory.
    let stored = sinks::query::request_hash(&state.pool, merchant.as_str(), &id.to_string())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    if let Some(hash) = stored {
        return if hash == valid.hash {
            Ok(replay(&body))
        } else {
            Err(conflict())
        };
    }
    // Not projected yet: the key is claimed here before anything is published, so of
    // concurrent requests with one key exactly one body is ever acknowledged.
    let claim = recent(&state).claim(
        merchant.as_str(),
        key.as_str(),
        &valid.hash,
        &id.to_string(),
    );
    if claim == Claim::OtherRequest {
        return Err(conflict());
    }
    let cmd = Command {
        command_id: command_id(&format!("create:{id}"))?,
        payment_id: id,
        issued_at_ms: now_ms(),
        body: CommandBody::Create(CreatePayment {
            merchant_id: merchant.clone(),
            amount: valid.amount,
            currency: valid.currency,
            idempotency_key: key.clone(),
            request_hash: valid.hash.clone(),
            reference: valid.reference.clone(),
            description: valid.description.clone(),
            traceparent: telemetry::current(),
            metadata: valid.metadata.clone(),
            screening: None,
        }),
    };
    let at = match publish(&state, &cmd).await {
        Ok(at) => at,
        Err(e) => {
            recent(&state).release(merchant.as_str(), key.as_str());
            return Err(e);
        }
    };
    recent(&state).published(
        merchant.as_str(),
        key.as_str(),
        at.offset,
        accepted(&cmd, &valid),
    );
    tracing::info!(payment_id = %id, merchant = %merchant, partition = at.partition, offset = at.offset, "payment accepted");
    let mut res = json(StatusCode::ACCEPTED, &body);
    if let Ok(loc) = format!("/v1/payments/{id}").parse() {
        res.headers_mut().insert("location", loc);
    }
    Ok(res)
}

pub(crate) fn recent(
    state: &ApiState,
) -> std::sync::MutexGuard<'_, RecentCreates<AcceptedPayment>> {
    state.recent.lock().unwrap_or_else(|e| e.into_inner())
}

/// A create in Kafka that the projection may not hold yet.
#[derive(Debug, Clone)]
pub struct AcceptedPayment {
    /// The payment as the projection will first show it: created at the command's
    /// `issued_at`, so it sorts in lists where its projected row will.
    pub view: PaymentView,
    /// Its history so far (a JSON array), as `GET /v1/payments/{id}/events` shows it;
    /// text, a tenth of the memory of a parsed value (it is read only in the
    /// projection's lag).
    pub events: Box<str>,
}

/// What a create published here reads back as until the projection has it: the payment
/// as `NEW` with its `created` event, both as the worker's first step will make them
/// (the domain's own `decide`, whose first event of a create is `created`).
fn accepted(cmd: &Command, v: &ValidCreate) -> AcceptedPayment {
    let created_at = payments::notify::iso_ms(cmd.issued_at_ms);
    let view = PaymentView {
        id: cmd.payment_id.to_string(),
        status: Status::New.as_str().to_owned(),
        amount: v.amount.minor_units(),
        currency: v.currency.as_str().to_owned(),
        reference: v.reference.clone(),
        description: v.description.clone(),
        metadata: serde_json::to_value(&v.metadata).unwrap_or_default(),
        provider_reference: None,
        failure_code: None,
        failure_message: None,
        cancel_requested: false,
        stuck: false,
        attempts: 0,
        amount_refunded: 0,
        refunded: false,
        version: 1,
        created_at: created_at.clone(),
        updated_at: created_at,
        idempotency_key: String::new(),
        request_hash: String::new(),
        created_at_us: cmd.issued_at_ms.saturating_mul(1000),
    };
    let events = match payments::decide(None, cmd, &payments::Policy::default()) {
        payments::Decision::Apply { events, .. } => events
            .into_iter()
            .take(1)
            .filter(|e| e.body.kind() == "created")
            .filter_map(|e| {
                serde_json::to_value(sinks::query::EventView {
                    seq: e.seq as i64,
                    kind: e.body.kind().to_owned(),
                    occurred_at: payments::notify::iso_ms(e.occurred_at_ms),
                    data: serde_json::to_value(&e.body).ok()?,
                })
                .ok()
            })
            .collect(),
        _ => Vec::new(),
    };
    AcceptedPayment {
        view,
        events: serde_json::Value::from(events).to_string().into(),
    }
}

/// The projection's answer or, for a create accepted here and not projected yet, what
/// it reads back as (read your writes); 404 when neither knows the payment.
fn projected_or_accepted<T: serde::Serialize>(
    state: &ApiState,
    merchant: &MerchantId,
    id: &PaymentId,
    projected: Option<T>,
    part: fn(&AcceptedPayment) -> Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    match projected {
        Some(p) => Ok(serde_json::to_value(p).unwrap_or_default()),
        None => recent(state)
            .accepted(merchant.as_str(), &id.to_string())
            .and_then(part)
            .ok_or_else(ApiError::not_found),
    }
}

pub async fn get_payment(
    state: Arc<ApiState>,
    id: String,
    authorization: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let id = parse_id(&id)?;
    let projected = sinks::query::get_payment(&state.pool, merchant.as_str(), &id.to_string())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let body = projected_or_accepted(&state, &merchant, &id, projected, |a| {
        serde_json::to_value(&a.view).ok()
    })?;
    Ok(json(StatusCode::OK, &body))
}

pub async fn payment_events(
    state: Arc<ApiState>,
    id: String,
    authorization: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let id = parse_id(&id)?;
    let projected = sinks::query::events(&state.pool, merchant.as_str(), &id.to_string())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let events = projected_or_accepted(&state, &merchant, &id, projected, |a| {
        serde_json::from_str(&a.events).ok()
    })?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "id": id.to_string(), "events": events }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    currency: Option<String>,
    reference: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

pub async fn list_payments(
    state: Arc<ApiState>,
    q: ListQuery,
    authorization: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "status {s:?} is not one of NEW, PROCESSING, COMPLETED, FAILED, CANCELED"
            ))
        })?),
    };
    let currency = match q.currency.as_deref() {
        None => None,
        Some(c) => Some(
            Currency::parse(c)
                .map_err(|e| ApiError::invalid(e.to_string()))?
                .to_string(),
        ),
    };
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| ApiError::invalid("limit must be an integer from 1 to 100"))?,
    };
    if let Some(r) = &q.reference {
        if r.chars().count() > MAX_REFERENCE || r.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "reference must be at most {MAX_REFERENCE} characters, without control characters"
            )));
        }
    }
    // An empty cursor is no cursor (a client passing back a null `next_cursor`).
    let after = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| ApiError::invalid("cursor is not one this API returned"))?,
        ),
    };
    let filter = ListFilter {
        status,
        currency,
        reference: q.reference,
        limit,
        after,
    };
    let (page, next) = list_with_accepted(&state, &merchant, &filter).await?;
    let next = next.map(|(us, id)| cursor::encode(&format!("{us}:{id}")));
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "data": page, "next_cursor": next }),
    ))
}

/// A page of the merchant's payments, newest first, and the position of its last one
/// when more follow: the projection's rows, and the creates this instance accepted that
/// the projection does not show yet, filtered, ordered and paged alike (read your
/// writes). A create sorts where its projected row will (its `created_at` is the
/// command's `issued_at`), so nothing moves to another page when the projection catches
/// up, and one both know is shown once, from the projection.
async fn list_with_accepted(
    state: &ApiState,
    merchant: &MerchantId,
    f: &ListFilter,
) -> Result<(Vec<PaymentView>, Option<(i64, String)>)> {
    let limit = usize::try_from(f.limit).unwrap_or(0);
    let asked = Instant::now();
    let (mut page, next) = sinks::query::list(&state.pool, merchant.as_str(), f)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    // With more rows to come the page ends at its last row: nothing below it is on it.
    let floor = next.as_ref().map(|(us, id)| (*us, id.as_str()));
    let shown: HashSet<&str> = page.iter().map(|p| p.id.as_str()).collect();
    let mut accepted: Vec<PaymentView> = recent(state)
        .not_in_projection(merchant.as_str(), asked, &shown, |a| {
            let on_page = listed(&a.view, f) && floor.is_none_or(|fl| position(&a.view) > fl);
            on_page.then(|| a.view.clone())
        })
        .into_iter()
        .map(|(_, view)| view)
        .collect();
    accepted.sort_by(|a, b| position(b).cmp(&position(a)));
    // Each may have been projected since `asked`, and changed since: then its row is
    // the answer. Only what can reach the page, and one more to tell whether more
    // follow, is asked about (one found projected is never asked about again).
    let mut merged = Vec::new();
    for view in accepted {
        if merged.len() > limit {
            break;
        }
        match sinks::query::get_payment(&state.pool, merchant.as_str(), &view.id)
            .await
            .map_err(|e| ApiError::internal(&e))?
        {
            Some(projected) => {
                recent(state).projected(merchant.as_str(), &projected.id);
                if listed(&projected, f) {
                    merged.push(projected);
                }
            }
            None => merged.push(view),
        }
    }
    let more = next.is_some() || page.len() + merged.len() > limit;
    page.extend(merged);
    page.sort_by(|a, b| position(b).cmp(&position(a)));
    page.truncate(limit);
    let next = more
        .then(|| page.last().map(|p| (p.created_at_us, p.id.clone())))
        .flatten();
    Ok((page, next))
}

/// Where a payment sorts in a list: the projection's `(created_at, payment_id)`.
fn position(p: &PaymentView) -> (i64, &str) {
    (p.created_at_us, &p.id)
}

/// Whether the list `f` asks for holds `p` (the projection's conditions, for a payment
/// it may not hold yet).
fn listed(p: &PaymentView, f: &ListFilter) -> bool {
    f.status.is_none_or(|s| p.status == s.as_str())
        && f.currency.as_ref().is_none_or(|c| p.currency == *c)
        && f.reference
            .as_ref()
            .is_none_or(|r| p.reference.as_ref() == Some(r))
        && f.after
            .as_ref()
            .is_none_or(|(us, id)| position(p) < (*us, id.as_str()))
}

/// A cursor this API returned: the creation time (µs, from 1970 to 9999) and id of the
/// last payment of a page. Anything else is the client's error, refused before the
/// database sees it.
fn decode_cursor(c: &str) -> Option<(i64, String)> {
    let raw = cursor::decode(c)?;
    let (us, id) = raw.split_once(':')?;
    let id = PaymentId::parse(id).ok()?;
    Some((cursor::micros(us)?, id.to_string()))
}

pub async fn cancel_payment(
    state: Arc<ApiState>,
    id: String,
    authorization: Option<String>,
    idempotency_key: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let id = parse_id(&id)?;
    let projected = sinks::query::get_payment(&state.pool, merchant.as_str(), &id.to_string())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let status = match projected {
        Some(p) => p.status,
        // Accepted here and not projected yet: it is NEW, and can be canceled.
        None if recent(&state)
            .accepted(merchant.as_str(), &id.to_string())
            .is_some() =>
        {
            Status::New.as_str().to_owned()
        }
        None => return Err(ApiError::not_found()),
    };
    if Status::parse(&status).is_some_and(Status::is_terminal) {
        return Err(ApiError::new(
            ErrorCode::AlreadyTerminal,
            format!("payment is {status}; it can no longer be canceled"),
        ));
    }
    let suffix = match idempotency_key {
        Some(k) => IdempotencyKey::parse(&k)
            .map_err(|e| ApiError::new(ErrorCode::InvalidIdempotencyKey, e.to_string()))?
            .to_string(),
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let mut hasher = Sha256::new();
    hasher.update(suffix.as_bytes());
    let cmd = Command {
        command_id: command_id(&format!(
            "cancel:{id}:{}",
            &hex::encode(hasher.finalize())[..32]
        ))?,
        payment_id: id,
        issued_at_ms: now_ms(),
        body: CommandBody::Cancel {
            merchant_id: merchant,
        },
    };
    let at = publish(&state, &cmd).await?;
    tracing::info!(payment_id = %id, partition = at.partition, offset = at.offset, "cancel accepted");
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "id": id.to_string(), "status": status, "cancel_requested": true }),
    ))
}
