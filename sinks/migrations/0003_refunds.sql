-- Refunds: part of their payment's state (payments.state->'refunds'), also kept as rows
-- so a refund can be read by its id. Rebuilt with everything else from the events.

ALTER TABLE payments ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0;

CREATE TABLE refunds (
    refund_id        text        PRIMARY KEY,
    payment_id       text        NOT NULL,
    merchant_id      text        NOT NULL,
    -- The refund's number within its payment (0, 1, ... in the order requested).
    refund_number    integer     NOT NULL,
    amount           bigint      NOT NULL,
    currency         char(3)     NOT NULL,
    status           text        NOT NULL,
    idempotency_key  text        NOT NULL,
    request_hash     text        NOT NULL,
    reason           text,
    provider_ref     text,
    failure_code     text,
    failure_message  text,
    -- The payment's seq when the row was written: a row never moves back.
    payment_seq      bigint      NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    UNIQUE (payment_id, refund_number)
);
