//! The one error shape of the API: `{"error": {"code", "message"}}` with a stable `code`
//! per kind of error, and the catalogue of those codes ([`ErrorCode`]): each with its
//! HTTP status and the line that documents it. The handlers and the OpenAPI document
//! both read the catalogue, so they cannot drift apart. A code is never reused for
//! another meaning.

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

macro_rules! catalogue {
    ($($variant:ident = ($status:ident, $code:literal, $doc:literal),)+) => {
        /// Every error the API answers with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $(#[doc = $doc] $variant,)+
        }

        impl ErrorCode {
            /// The whole catalogue, in the order it is written.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            /// The HTTP status answered with this code.
            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)+
                }
            }

            /// The `code` of the error body.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)+
                }
            }

            /// What the code means, for the API's documentation.
            pub fn doc(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $doc,)+
                }
            }
        }
    };
}

catalogue! {
    InvalidRequest = (BAD_REQUEST, "invalid_request", "a field, filter, cursor, query string or header is invalid"),
    InvalidJson = (BAD_REQUEST, "invalid_json", "the body is not the JSON object the route takes"),
    CardDataRejected = (BAD_REQUEST, "card_data_rejected", "a field looks like a card number: send a provider token, never card data"),
    MissingIdempotencyKey = (BAD_REQUEST, "missing_idempotency_key", "the Idempotency-Key header is required"),
    InvalidIdempotencyKey = (BAD_REQUEST, "invalid_idempotency_key", "the Idempotency-Key is not 1 to 255 printable ASCII characters"),
    InvalidWebhook = (BAD_REQUEST, "invalid_webhook", "the webhook's headers or body are malformed"),
    Unauthorized = (UNAUTHORIZED, "unauthorized", "missing or unknown API key"),
    InvalidSignature = (UNAUTHORIZED, "invalid_signature", "the webhook's signature is bad, missing, stale or from the future"),
    PaymentNotFound = (NOT_FOUND, "payment_not_found", "no such payment for this merchant"),
    RefundNotFound = (NOT_FOUND, "refund_not_found", "no such refund for this merchant"),
    DeliveryNotFound = (NOT_FOUND, "delivery_not_found", "no such notification for this merchant"),
    UnknownProvider = (NOT_FOUND, "unknown_provider", "no provider of that name"),
    NotFound = (NOT_FOUND, "not_found", "no such route"),
    MethodNotAllowed = (METHOD_NOT_ALLOWED, "method_not_allowed", "the route does not take that method (see `Allow`)"),
    RequestTimeout = (REQUEST_TIMEOUT, "request_timeout", "the body did not arrive within 10 s"),
    AlreadyTerminal = (CONFLICT, "already_terminal", "the payment is already terminal"),
    NoNotificationEndpoint = (CONFLICT, "no_notification_endpoint", "the merchant had no notification endpoint when the notification was made"),
    PaymentNotCompleted = (CONFLICT, "payment_not_completed", "only a COMPLETED payment can be refunded"),
    RefundWindowClosed = (CONFLICT, "refund_window_closed", "the payment completed longer ago than refunds are accepted (see the topology's retention)"),
    AmountExceedsRefundable = (CONFLICT, "amount_exceeds_refundable", "the refund exceeds what is left to refund (the captured amount less succeeded and pending refunds)"),
    LengthRequired = (LENGTH_REQUIRED, "length_required", "a Content-Length header is required"),
    PayloadTooLarge = (PAYLOAD_TOO_LARGE, "payload_too_large", "the body is over the route's limit (16 KiB; 64 KiB for webhooks)"),
    UnsupportedMediaType = (UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "the body is not application/json"),
    IdempotencyKeyReused = (UNPROCESSABLE_ENTITY, "idempotency_key_reused", "the Idempotency-Key was used with another request"),
    RateLimited = (TOO_MANY_REQUESTS, "rate_limited", "over the merchant's rate limit; retry after `Retry-After`"),
    Unavailable = (SERVICE_UNAVAILABLE, "unavailable", "a dependency is unavailable; retry after `Retry-After` (with the same Idempotency-Key)"),
    RefundsNotEnabled = (NOT_IMPLEMENTED, "refunds_not_enabled", "this gateway's topology has no refund processor"),
    Overloaded = (SERVICE_UNAVAILABLE, "overloaded", "over an admission bound (the workers' backlog, or the creates this API handles at once) and nothing was queued; retry after `Retry-After` with the same Idempotency-Key"),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn unauthorized() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "send your API key as `Authorization: Bearer <key>`",
        )
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn not_found() -> Self {
        Self::new(ErrorCode::PaymentNotFound, "no such payment")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(ErrorCode::Unavailable, message)
        }
    }

    /// A create refused by admission control: nothing was claimed or queued.
    pub fn overloaded(retry_after_s: u32) -> Self {
        ApiError {
            retry_after: Some(retry_after_s),
            ..Self::new(
                ErrorCode::Overloaded,
                format!("the gateway is processing more payments than it can take now and queued nothing; retry in {retry_after_s} s (Retry-After) with the same Idempotency-Key"),
            )
        }
    }

    pub fn internal(e: &anyhow::Error) -> Self {
        tracing::error!(error = %format!("{e:#}"), "request failed");
        Self::unavailable("the payment store is unavailable; retry later")
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code.as_str(),
                message: &self.message,
            },
        };
        let mut res =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = s.to_string().parse() {
                res.headers_mut().insert("retry-after", v);
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_is_one_meaning_with_an_error_status() {
        let mut seen = HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{} is listed twice", c.as_str());
            let s = c.status().as_u16();
            assert!((400..600).contains(&s), "{} answers {s}", c.as_str());
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{} is not snake_case",
                c.as_str()
            );
            assert!(!c.doc().is_empty());
        }
    }

    #[test]
    fn the_body_carries_the_code_and_retry_after_the_header() {
        let res = ApiError::unavailable("later").into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            res.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
    }
}
