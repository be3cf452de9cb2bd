//! The OpenAPI 3 description of the API, served at `GET /openapi.json`. A test checks it
//! against the router: every documented operation exists, and every route is documented.

use crate::error::ErrorCode;
use serde_json::{json, Value};

/// Every operation of the API: (method, path template).
pub const OPERATIONS: &[(&str, &str)] = &[
    ("post", "/v1/payments"),
    ("get", "/v1/payments"),
    ("get", "/v1/payments/{id}"),
    ("get", "/v1/payments/{id}/events"),
    ("post", "/v1/payments/{id}/cancel"),
    ("post", "/v1/payments/{id}/refunds"),
    ("get", "/v1/payments/{id}/refunds"),
    ("get", "/v1/refunds/{id}"),
    ("get", "/v1/webhook-deliveries"),
    ("post", "/v1/webhook-deliveries/{id}/redeliver"),
    ("post", "/v1/callbacks/{provider}"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/openapi.json"),
];

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// The error responses of an operation, one per status, each describing its codes from
/// the catalogue.
fn errors(codes: &[ErrorCode]) -> serde_json::Map<String, Value> {
    let mut by_status: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for c in codes {
        by_status
            .entry(c.status().as_u16())
            .or_default()
            .push(format!("{} (`{}`)", c.doc(), c.as_str()));
    }
    by_status
        .into_iter()
        .map(|(status, d)| (status.to_string(), error_response(&d.join("; "))))
        .collect()
}

fn with(mut base: serde_json::Map<String, Value>, ok: (&str, Value)) -> Value {
    base.insert(ok.0.to_owned(), ok.1);
    Value::Object(base)
}

fn json_body(schema: &str, description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

pub fn document() -> Value {
    let id_param = json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^pay_[0-9a-f]{32}$" } });
    use ErrorCode::*;
    // Every authenticated operation can answer these.
    let auth = [Unauthorized, Unavailable, RateLimited];
    let and_auth = |codes: &[ErrorCode]| -> Vec<ErrorCode> {
        codes.iter().chain(auth.iter()).copied().collect()
    };
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    // What each read shows of a write just accepted (README, "Consistency of reads"): a
    // write is answered once its command is in Kafka, before the projection has it.
    let single_read = |what: &str| {
        format!("Read your writes: the API instance that accepted it answers at once, with {what}, until the projection has it; from then on every instance answers from the projection (another may answer 404 within the projection's lag, milliseconds under normal load).")
    };
    let delivery = json!({
        "type": "object", "required": ["id", "type", "payment_id", "seq", "status", "attempts", "created_at", "body", "attempt_log"],
        "properties": {
            "id": { "type": "string", "description": "the webhook-id of every delivery of it" },
            "type": { "type": "string", "enum": ["payment.created", "payment.processing", "payment.completed", "payment.failed", "payment.canceled", "refund.pending", "refund.succeeded", "refund.failed"] },
            "payment_id": { "type": "string" }, "seq": { "type": "integer" },
            "status": { "type": "string", "enum": ["pending", "delivered", "failed", "skipped"] },
            "attempts": { "type": "integer" },
            "created_at": { "type": "string", "format": "date-time" },
            "delivered_at": { "type": "string", "format": "date-time", "nullable": true },
            "next_attempt_at": { "type": "string", "format": "date-time", "nullable": true },
            "last_error": { "type": "string", "nullable": true },
            "body": { "type": "object", "description": "what the endpoint receives" },
            "attempt_log": { "type": "array", "items": { "type": "object", "required": ["attempt", "at", "duration_ms"], "properties": {
                "attempt": { "type": "integer" }, "at": { "type": "string", "format": "date-time" },
                "status_code": { "type": "integer", "nullable": true }, "error": { "type": "string", "nullable": true }, "duration_ms": { "type": "integer" }
            } } }
        }
    });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Payment gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Accepts payments, processes them asynchronously against payment providers, and reports their life cycle. Amounts are integers in minor units with an ISO 4217 currency. Every error has the shape {\"error\": {\"code\", \"message\"}}."
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/v1/payments": {
                "post": {
                    "operationId": "createPayment",
                    "summary": "Accept a payment (processed asynchronously)",
                    "parameters": [{ "name": "Idempotency-Key", "in": "header", "required": true, "schema": { "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$" } }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CreatePayment" } } } },
                    "responses": with(errors(&and_auth(&[
                        InvalidJson, InvalidRequest, MissingIdempotencyKey, InvalidIdempotencyKey,
                        CardDataRejected, RequestTimeout, PayloadTooLarge, UnsupportedMediaType,
                        IdempotencyKeyReused, Overloaded,
                    ])), ("202", json_body("Accepted", "accepted; the same key and body replay this answer"))),
                },
                "get": {
                    "operationId": "listPayments",
                    "summary": "The caller's payments, newest first",
                    "description": "Read your writes: the projection's payments and those this API instance accepted that the projection does not show yet (each as `GET /v1/payments/{id}` shows it: `NEW` until the projection knows more), filtered, ordered (`created_at`, then id, newest first) and paged by the same cursor. A payment sorts where its projected row will, so none is listed twice or moves to another page when the projection catches up; one both know is shown from the projection. Why: a create is answered once its command is in Kafka, before the projection has it, and a client that creates and then lists must find what it created. Another instance lists it once its projection has it.",
                    "parameters": [
                        { "name": "status", "in": "query", "schema": { "$ref": "#/components/schemas/Status" } },
                        { "name": "currency", "in": "query", "schema": { "$ref": "#/components/schemas/Currency" } },
                        { "name": "reference", "in": "query", "schema": { "type": "string", "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 20 } },
                        { "name": "cursor", "in": "query", "description": "opaque: the `next_cursor` of a previous page", "schema": { "type": "string", "maxLength": 200, "pattern": "^[A-Za-z0-9_-]*$" } }
                    ],
                    "responses": with(errors(&and_auth(&[InvalidRequest])), ("200", json_body("PaymentList", "a page"))),
                }
            },
            "/v1/payments/{id}": { "get": {
                "operationId": "getPayment", "summary": "A payment's current state",
                "description": single_read("the payment as `NEW`, version 1"), "parameters": [id_param.clone()],
                "responses": with(errors(&and_auth(&[PaymentNotFound])), ("200", json_body("Payment", "the payment"))),
            }},
            "/v1/payments/{id}/events": { "get": {
                "operationId": "getPaymentEvents", "summary": "A payment's history, in order",
                "description": single_read("its `created` event"), "parameters": [id_param.clone()],
                "responses": with(errors(&and_auth(&[PaymentNotFound])), ("200", json_body("History", "the events"))),
            }},
            "/v1/payments/{id}/cancel": { "post": {
                "operationId": "cancelPayment", "summary": "Ask to cancel a payment (NEW: at once; PROCESSING: when the provider confirms)",
                "parameters": [id_param, { "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$" } }],
                "responses": with(errors(&and_auth(&[
                    InvalidIdempotencyKey, PaymentNotFound, AlreadyTerminal,
                ])), ("202", json_body("CancelAccepted", "cancel requested"))),
            }},
            "/v1/payments/{id}/refunds": {
                "post": {
                    "operationId": "createRefund",
                    "summary": "Refund (part of) a COMPLETED payment (processed asynchronously)",
                    "parameters": [id_param.clone(), { "name": "Idempotency-Key", "in": "header", "required": true, "schema": { "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$" } }],
                    "requestBody": { "required": false, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CreateRefund" } } } },
                    "responses": with(errors(&and_auth(&[
                        InvalidJson, InvalidRequest, MissingIdempotencyKey, InvalidIdempotencyKey,
                        CardDataRejected, RequestTimeout, PayloadTooLarge, UnsupportedMediaType,
                        IdempotencyKeyReused, PaymentNotFound, PaymentNotCompleted, AmountExceedsRefundable,
                        RefundWindowClosed, RefundsNotEnabled,
                    ])), ("202", json_body("Refund", "accepted; the outcome is the refund's status (the same key and body replay this answer)"))),
                },
                "get": {
                    "operationId": "listRefunds", "summary": "A payment's refunds, in the order requested",
                    "description": "Read your writes: the projection's refunds, then those this API instance accepted that the projection does not show yet, in the order the worker applies them (after every projected one), each as `GET /v1/refunds/{id}` shows it (`PENDING`); one both know is shown from the projection. Another instance lists a refund once its projection has it.",
                    "parameters": [id_param.clone()],
                    "responses": with(errors(&and_auth(&[PaymentNotFound])), ("200", json_body("RefundList", "the refunds"))),
                }
            },
            "/v1/refunds/{id}": { "get": {
                "operationId": "getRefund", "summary": "A refund's current state",
                "description": single_read("the refund as `PENDING`"),
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^re_[0-9a-f]{32}$" } }],
                "responses": with(errors(&and_auth(&[RefundNotFound])), ("200", json_body("Refund", "the refund"))),
            }},
            "/v1/webhook-deliveries": { "get": {
                "operationId": "listWebhookDeliveries", "summary": "The caller's notifications (status changes of its payments and refunds) and their delivery, newest first, a page at a time",
                "description": "Not read your writes: the API accepts no notification. The worker makes one for each status change and the sink writes it, so it is listed once the projection has it, trailing its event by the projection's lag (milliseconds under normal load; `gateway_projection_lag_seconds`, and the `ProjectionLagHigh` alert past 30 s at p99; a sink that stops applying is reported after 30 s and restarted after 90 s). A payment just accepted has none listed, not even `payment.created`, until then. A delivery's status and attempts, and a redelivery, are written to PostgreSQL itself and read back at once on every instance.",
                "parameters": [
                    { "name": "payment_id", "in": "query", "schema": { "type": "string", "pattern": "^pay_[0-9a-f]{32}$" } },
                    { "name": "status", "in": "query", "schema": { "type": "string", "enum": ["pending", "delivered", "failed", "skipped"] } },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 20 } },
                    { "name": "cursor", "in": "query", "description": "opaque: the `next_cursor` of a previous page", "schema": { "type": "string", "maxLength": 200, "pattern": "^[A-Za-z0-9_-]*$" } }
                ],
                "responses": with(errors(&and_auth(&[InvalidRequest])), ("200", json_body("DeliveryList", "the notifications"))),
            }},
            "/v1/webhook-deliveries/{id}/redeliver": { "post": {
                "operationId": "redeliverWebhook", "summary": "Deliver a notification again now (same webhook-id)",
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^evt_[0-9a-f]{32}_[0-9]+$" } }],
                "responses": with(errors(&and_auth(&[DeliveryNotFound, NoNotificationEndpoint])), ("202", json!({ "description": "scheduled", "content": { "application/json": { "schema": { "type": "object", "required": ["id", "status"], "properties": { "id": { "type": "string" }, "status": { "type": "string" } } } } } }))),
            }},
            "/v1/callbacks/{provider}": { "post": {
                "operationId": "providerWebhook", "summary": "Signed provider webhook (Standard Webhooks)", "security": [],
                "parameters": [
                    { "name": "provider", "in": "path", "required": true, "schema": { "type": "string" } },
                    { "name": "webhook-id", "in": "header", "required": true, "schema": { "type": "string" } },
                    { "name": "webhook-timestamp", "in": "header", "required": true, "schema": { "type": "string" } },
                    { "name": "webhook-signature", "in": "header", "required": true, "schema": { "type": "string" } }
                ],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object" } } } },
                "responses": with(errors(&[
                    InvalidWebhook, InvalidSignature, UnknownProvider, RequestTimeout, PayloadTooLarge,
                    Unavailable,
                ]), ("204", json!({ "description": "accepted (or an event type that needs no action)" }))),
            }},
            "/health/live": { "get": { "operationId": "live", "security": [], "responses": { "200": { "description": "the process runs" } } } },
            "/health/ready": { "get": { "operationId": "ready", "security": [], "responses": with(errors(&[Unavailable]), ("200", json!({ "description": "ready" }))) } },
            "/openapi.json": { "get": { "operationId": "openapi", "security": [], "responses": { "200": { "description": "this document", "content": { "application/json": { "schema": { "type": "object" } } } } } } }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "the merchant's API key" } },
            "schemas": {
                "Status": { "type": "string", "enum": ["NEW", "PROCESSING", "COMPLETED", "FAILED", "CANCELED"] },
                "Currency": { "type": "string", "description": "active ISO 4217 code", "enum": payments::Currency::codes() },
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": { "code": { "type": "string", "enum": codes }, "message": { "type": "string" } } } } },
                "CreatePayment": {
                    "type": "object", "additionalProperties": false, "required": ["amount", "currency"],
                    "properties": {
                        "amount": { "type": "integer", "minimum": 1, "maximum": 1_000_000_000_000_i64, "description": "minor units" },
                        "currency": { "$ref": "#/components/schemas/Currency" },
                        "reference": { "type": "string", "maxLength": 128, "nullable": true, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$" },
                        "description": { "type": "string", "maxLength": 512, "nullable": true, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$" },
                        "metadata": { "type": "object", "nullable": true, "maxProperties": 20, "propertyNames": { "pattern": "^[A-Za-z0-9_.-]{1,40}$" }, "additionalProperties": { "type": "string", "maxLength": 200, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$" }, "description": "your key-value pairs (at most 20; keys up to 40 characters of letters, digits, _ - .; values up to 200 characters); never card data" }
                    }
                },
                "Accepted": {
                    "type": "object", "required": ["id", "status", "amount", "currency"],
                    "properties": {
                        "id": { "type": "string" }, "status": { "$ref": "#/components/schemas/Status" },
                        "amount": { "type": "integer" }, "currency": { "type": "string" },
                        "reference": { "type": "string", "nullable": true }, "description": { "type": "string", "nullable": true },
                        "metadata": { "type": "object", "additionalProperties": { "type": "string" } },
                        "links": { "type": "object" }
                    }
                },
                "Payment": {
                    "type": "object", "required": ["id", "status", "amount", "currency", "version", "created_at", "updated_at"],
                    "properties": {
                        "id": { "type": "string" }, "status": { "$ref": "#/components/schemas/Status" },
                        "amount": { "type": "integer" }, "currency": { "type": "string" },
                        "reference": { "type": "string", "nullable": true }, "description": { "type": "string", "nullable": true },
                        "metadata": { "type": "object", "additionalProperties": { "type": "string" } },
                        "provider_reference": { "type": "string", "nullable": true },
                        "failure_code": { "type": "string", "nullable": true }, "failure_message": { "type": "string", "nullable": true },
                        "cancel_requested": { "type": "boolean" }, "stuck": { "type": "boolean" }, "attempts": { "type": "integer" },
                        "amount_refunded": { "type": "integer", "description": "what succeeded refunds returned" },
                        "refunded": { "type": "boolean", "description": "the whole amount is refunded" },
                        "version": { "type": "integer", "description": "seq of the last event" },
                        "created_at": { "type": "string", "format": "date-time" }, "updated_at": { "type": "string", "format": "date-time" }
                    }
                },
                "PaymentList": { "type": "object", "required": ["data"], "properties": { "data": { "type": "array", "items": { "$ref": "#/components/schemas/Payment" } }, "next_cursor": { "type": "string", "nullable": true } } },
                "History": {
                    "type": "object", "required": ["id", "events"],
                    "properties": { "id": { "type": "string" }, "events": { "type": "array", "items": {
                        "type": "object", "required": ["seq", "type", "occurred_at", "data"],
                        "properties": { "seq": { "type": "integer" }, "type": { "type": "string" }, "occurred_at": { "type": "string", "format": "date-time" }, "data": { "type": "object" } }
                    } } }
                },
                "CreateRefund": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "amount": { "type": "integer", "minimum": 1, "maximum": 1_000_000_000_000_i64, "nullable": true, "description": "minor units of the payment's currency; absent: what is left to refund" },
                        "reason": { "type": "string", "maxLength": 256, "nullable": true, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$" }
                    }
                },
                "RefundStatus": { "type": "string", "enum": ["PENDING", "SUCCEEDED", "FAILED"] },
                "Refund": {
                    "type": "object", "required": ["id", "payment_id", "status", "currency", "created_at", "updated_at"],
                    "properties": {
                        "id": { "type": "string" }, "payment_id": { "type": "string" },
                        "amount": { "type": "integer", "nullable": true, "description": "null until a request for what is left is applied" },
                        "currency": { "type": "string" }, "status": { "$ref": "#/components/schemas/RefundStatus" },
                        "reason": { "type": "string", "nullable": true },
                        "provider_reference": { "type": "string", "nullable": true },
                        "failure_code": { "type": "string", "nullable": true }, "failure_message": { "type": "string", "nullable": true },
                        "created_at": { "type": "string", "format": "date-time" }, "updated_at": { "type": "string", "format": "date-time" },
                        "links": { "type": "object" }
                    }
                },
                "Delivery": delivery,
                "DeliveryList": { "type": "object", "required": ["data"], "properties": { "data": { "type": "array", "items": { "$ref": "#/components/schemas/Delivery" } }, "next_cursor": { "type": "string", "nullable": true } } },
                "RefundList": { "type": "object", "required": ["payment_id", "data"], "properties": { "payment_id": { "type": "string" }, "data": { "type": "array", "items": { "$ref": "#/components/schemas/Refund" } } } },
                "CancelAccepted": { "type": "object", "required": ["id", "status", "cancel_requested"], "properties": { "id": { "type": "string" }, "status": { "$ref": "#/components/schemas/Status" }, "cancel_requested": { "type": "boolean" } } }
            }
        }
    })
}

/// The methods the API serves at `path`, if the path is one of its routes.
pub fn allowed_methods(path: &str) -> Option<Vec<&'static str>> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let methods: Vec<&'static str> = OPERATIONS
        .iter()
        .filter(|(_, template)| {
            let t: Vec<&str> = template.trim_matches('/').split('/').collect();
            t.len() == segments.len()
                && t.iter()
                    .zip(&segments)
                    .all(|(t, s)| (t.starts_with('{') && !s.is_empty()) || t == s)
        })
        .map(|(m, _)| *m)
        .collect();
    (!methods.is_empty()).then_some(methods)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every read of the merchant API says what it shows of a write just accepted.
    #[test]
    fn every_read_states_its_consistency() {
        let doc = document();
        for (method, path) in OPERATIONS
            .iter()
            .filter(|(m, p)| *m == "get" && p.starts_with("/v1/"))
        {
            let description = doc["paths"][path][method]["description"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase();
            assert!(
                description.contains("read your writes"),
                "{method} {path}: {description:?}"
            );
        }
    }
}
