-- The projection of the events topic. Rebuildable at any time from Kafka.

CREATE TABLE payments (
    payment_id       text PRIMARY KEY,
    merchant_id      text        NOT NULL,
    status           text        NOT NULL,
    amount           bigint      NOT NULL CHECK (amount > 0),
    currency         char(3)     NOT NULL,
    idempotency_key  text        NOT NULL,
    request_hash     text        NOT NULL,
    reference        text,
    description      text,
    provider_ref     text,
    failure_code     text,
    failure_message  text,
    attempts         integer     NOT NULL,
    cancel_requested boolean     NOT NULL,
    stuck            boolean     NOT NULL,
    seq              bigint      NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    -- The full folded state (payments::machine::PaymentState), for exact comparisons.
    state            jsonb       NOT NULL,
    projected_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (merchant_id, idempotency_key)
);

CREATE INDEX payments_by_merchant ON payments (merchant_id, created_at DESC, payment_id DESC);
CREATE INDEX payments_by_status ON payments (merchant_id, status, created_at DESC, payment_id DESC);
CREATE INDEX payments_open ON payments (updated_at) WHERE status IN ('NEW', 'PROCESSING');

CREATE TABLE payment_events (
    payment_id   text        NOT NULL,
    seq          bigint      NOT NULL CHECK (seq > 0),
    type         text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    caused_by    text        NOT NULL,
    event        jsonb       NOT NULL,
    kafka_partition integer  NOT NULL,
    kafka_offset bigint      NOT NULL,
    projected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_id, seq)
);

-- Next offset to read per topic partition, committed with the rows it produced.
CREATE TABLE sink_progress (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

CREATE TABLE dead_letters (
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    reason           text        NOT NULL,
    detail           text        NOT NULL,
    processor        text        NOT NULL,
    record_key       text,
    payload          text,
    failed_at        timestamptz NOT NULL,
    PRIMARY KEY (source_topic, source_partition, source_offset)
);

CREATE TABLE webhooks_received (
    command_id  text PRIMARY KEY,
    payment_id  text        NOT NULL,
    outcome     jsonb       NOT NULL,
    received_at timestamptz NOT NULL
);
CREATE INDEX webhooks_by_payment ON webhooks_received (payment_id);
