-- Reconciliation as a bureau accepts it (issue #18): each settlement's insurance type
-- (insutype) and clearing type (clr_type), empty for settlements recorded before; and the
-- days an institution closed, with their totals fixed then.
ALTER TABLE settlements ADD COLUMN insurance_type text NOT NULL DEFAULT '';
ALTER TABLE settlements ADD COLUMN clearing_type text NOT NULL DEFAULT '';
-- A family member's bill on the holder's card: its account payment is family mutual aid.
ALTER TABLE settlements ADD COLUMN delegated boolean NOT NULL DEFAULT false;

CREATE TABLE closed_days (
    institution text NOT NULL,
    day         text NOT NULL,
    closed_at   bigint NOT NULL,
    totals      text NOT NULL,
    PRIMARY KEY (institution, day)
);
