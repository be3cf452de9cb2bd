-- The trace context of the notification's record (its `traceparent` header: the span that
-- published it, in the payment's trace), so every delivery attempt joins the trace of the
-- payment it is about. Empty for a record published untraced.
ALTER TABLE webhook_deliveries ADD COLUMN traceparent text;
