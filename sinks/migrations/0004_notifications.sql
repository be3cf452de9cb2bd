-- Merchant notifications to deliver, and every attempt. Written by the sink (one row per
-- notification, whatever its redeliveries) and by the notifier (status, attempts). This
-- is delivery state, not payment state: a rebuilt projection keeps it, and a notification
-- replayed from Kafka into an empty table is delivered again under the same webhook-id.

CREATE TABLE webhook_deliveries (
    webhook_id      text        PRIMARY KEY,
    merchant_id     text        NOT NULL,
    payment_id      text        NOT NULL,
    seq             bigint      NOT NULL,
    type            text        NOT NULL,
    -- The body delivered, as the merchant receives it.
    body            text        NOT NULL,
    -- pending | delivered | failed (gave up) | skipped (the merchant has no endpoint)
    status          text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_merchant ON webhook_deliveries (merchant_id, created_at DESC, webhook_id);
CREATE INDEX webhook_deliveries_by_payment ON webhook_deliveries (merchant_id, payment_id, seq);

CREATE TABLE webhook_attempts (
    webhook_id  text        NOT NULL,
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL,
    -- The endpoint's HTTP status, or none when no answer came.
    status_code integer,
    error       text,
    duration_ms integer     NOT NULL,
    PRIMARY KEY (webhook_id, attempt)
);
