-- The outpatient pooling's own year-to-date figure (issue #17): of fund_paid_fen, what the
-- funds paid for outpatient care, for a ceiling of its own.
ALTER TABLE accumulators ADD COLUMN outpatient_fund_paid_fen bigint NOT NULL DEFAULT 0;
