-- A payment's id is derived from its merchant and idempotency key (UUIDv5 of both), so the
-- primary key already makes (merchant_id, idempotency_key) unique. The second unique index
-- served no query and cost an index entry on every insert and update of a payment (two a
-- payment: its status changes are never HOT updates).
ALTER TABLE payments DROP CONSTRAINT IF EXISTS payments_merchant_id_idempotency_key_key;
