-- Events stored but not yet folded into their payment's row because an earlier event
-- has not arrived yet (a gap in `seq`). The fold reads only these from the database;
-- every other event it folds comes straight from the batch that carries it.
CREATE TABLE projection_waiting (
    payment_id text   NOT NULL,
    seq        bigint NOT NULL,
    PRIMARY KEY (payment_id, seq)
);

-- A projection written before this table existed: its waiting events are the stored
-- ones beyond their payment's row.
INSERT INTO projection_waiting (payment_id, seq)
SELECT e.payment_id, e.seq
FROM payment_events e LEFT JOIN payments p ON p.payment_id = e.payment_id
WHERE e.seq > COALESCE(p.seq, 0);
