-- Step 4: idempotent creation. A create request carrying a request_id is recorded here in the
-- transaction that performs it; a retry with the same id gets the original result back, a
-- different request with the same id is refused.
CREATE TABLE idempotent_requests (
    request_id  TEXT NOT NULL PRIMARY KEY,
    -- The RPC, e.g. 'CreateDelegation'.
    method      TEXT NOT NULL,
    -- The validated request, as canonical JSON: a retry must match it exactly.
    request     TEXT NOT NULL,
    -- The record the request created, as it was returned.
    response    TEXT,
    created_at  TIMESTAMP NOT NULL
);
