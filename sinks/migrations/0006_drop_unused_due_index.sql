-- Since 0005 the notifier picks due deliveries through webhook_deliveries_due_by_merchant;
-- the index on next_attempt_at alone serves no query and cost a write on every
-- notification the sink records (three a payment) and every claim.
DROP INDEX IF EXISTS webhook_deliveries_due;
