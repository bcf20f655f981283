"""Capture: consenting tenants' requests and answers, and feedback on them, in one store (README "The
learning loop"). Nothing is captured for a tenant whose policy does not say `capture: {enabled: true}`.

Modules
  records       CaptureRecord (one captured request), Feedback (a signal on one), Captured (a record with
                its feedback): msgspec Structs, stored as JSON.
  store         the CaptureStore Protocol, CaptureQuery, `scan`, `open_capture_store(url)`.
  sqlite_store  one SQLite file (WAL), every call in one worker thread: the embedded default.
  postgres_store  PostgreSQL (psycopg 3, async): several replicas, one store.
  sql           the SQL both share (tables `strait_captures`, `strait_feedback`).
  redact        the built-in pattern redactor and plugin redactors (entry point `strait.redactors`).
  assemble      canonical request and answer (JSON or stream) -> capture Structs, redacted.
  writer        CaptureWriter: the bounded queue, batches written off the request path, regenerate
                detection, retention.
  shadow_sink   CaptureShadowSink: a route's shadow copies' answers stored beside the live record (only
                when the live request was captured).
  eligibility   consent and licence checks of a record for a training target (families, fail-closed).
  formats       fine-tuning lines: openai-chat-jsonl, anthropic-jsonl, preference-jsonl.
  export        `strait datasets export`: streamed, reasons counted, manifest.json with sha256.
  compare       `strait datasets compare`: live vs candidate (shadow pairs with agreement, canary share).
  datasets_cli  the `strait datasets` commands (argparse, STRAIT_CAPTURE, the policy in force).
The tap that feeds the writer is gateway.stages.capture; POST /v1/feedback is gateway.api.feedback.

Which store: one setting, `STRAIT_CAPTURE` (gateway.settings.Settings.capture_url), read by `strait
serve` and by anything that reads the store (`strait datasets`): `sqlite:///relative/capture.db`,
`sqlite:////absolute/capture.db`, `postgresql://user@host:5432/db`, or `off`. Unset: `capture.db` beside
the spool directory (`.strait/capture.db` for `make run`).

Reading the store (what `strait datasets export/compare` builds on):

    settings = Settings.from_env()
    store = await open_capture_store(settings.capture_url)      # creates the schema if missing
    try:
        query = CaptureQuery(route="chat", since_ms=..., until_ms=..., tenant=None, model="m")
        async for item in scan(store, query):                   # every match, a page (500) at a time,
            record, feedback = item.record, item.feedback       # in (ts_ms, request_id) order
            ...
    finally:
        await store.aclose()

- Filters (`CaptureQuery`, each None = any): tenant, route (the route the client named, after a budget
  downgrade the downgrade route), model (the policy model that answered), since_ms (inclusive) and
  until_ms (exclusive) on the request's start, epoch ms. Pages are keyset (`after`), so a long export
  holds one page in memory.
- Each `Captured` carries its feedback, oldest first: kind `score` (-10..10), `boolean` (score 1 / -1),
  `label`, `correction` (an edited answer, redacted), and implicit: `regenerate` (`by_request_id` is
  the request that re-sent the same conversation), `cache_bad_hit` (a cached answer reported wrong,
  the reason in `metadata`); `weight` and `metadata` as given.
- Consent and licence, per record: `consent_training` (the tenant's `capture.training` when captured),
  `licence` / `licence_outputs_train` (the answering model's licence: None = unknown, treat as "no"),
  `origin_developer` / `origin_country`, `policy_version`, `decision_id`, `include` (what the consent let
  in: a record without prompts has `request.messages == ()`), `redacted_with`.
- Request: `request.messages` in OpenAI chat shape (role, content text, tool_calls, tool_call_id),
  `request.tools` (name, description, parameters as JSON text), sampling; completions have `prompts`.
  Answer: `answer.content`, `answer.tool_calls`, `answer.finish_reason`, `answer.truncated` (a stream
  longer than the capture keeps). Failed requests are captured too (status, outcome, answer None).
- Other reads: `get(tenant, request_id)`, `resolve(tenant, request_id=, client_id=, response_id=)` (tenant-scoped:
  another tenant's id is "absent"), `tenants()`, `counts()`; writes: `write(records, feedback)`
  (idempotent by id), `delete_before(tenant, ms)` (retention).
"""
