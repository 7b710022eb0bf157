-- Encounters (issue #17): a hospital's visit or stay, settled in steps. Its content is sealed
-- (it names the patient); `version` rises by one with every change, and a change is stored
-- only over the version it was made from. A token an encounter spent is in used_tokens under
-- the encounter's id.
CREATE TABLE encounters (
    id              text PRIMARY KEY,
    institution     text NOT NULL,
    idempotency_key text NOT NULL,
    request_hash    bytea NOT NULL,
    token_id        bytea,
    card_hash       bytea NOT NULL,
    created_at      bigint NOT NULL,
    version         bigint NOT NULL,
    sealed          bytea NOT NULL,
    CONSTRAINT encounters_idempotency_key UNIQUE (institution, idempotency_key)
);
