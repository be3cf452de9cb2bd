-- The notifier picks each merchant's due deliveries separately (at most its free slots):
-- an index per merchant, in the order they fall due.
CREATE INDEX webhook_deliveries_due_by_merchant
    ON webhook_deliveries (merchant_id, next_attempt_at) WHERE status = 'pending';

-- Settled deliveries go after their keep time (NOTIFY_KEEP_DAYS), oldest first.
CREATE INDEX webhook_deliveries_settled
    ON webhook_deliveries (created_at) WHERE status <> 'pending';
