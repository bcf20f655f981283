-- Admission: every check of one request in one round trip, all-or-nothing. Mirrors gcra.py and
-- MemoryStore.admit_now; keep the three in step (the model test compares them).
--
-- KEYS: [1] the tenant's state hash, [1 + j] budget j's counter hash {s: spent}
-- ARGV: [1] now_ms or '' (TIME)
--       [2] deadline: the latest Redis time (ms) at which the caller still waits for this answer, or ''
--       [3] request id (encoded)
--       [4] the binding's admit template (layout.py)
--       [5] lease_ms ticket_ttl_ms(0: no ticket) tokens cost_micro_usd
-- Returns {allowed, now_ms, then 5 integers per check: allowed, remaining, reset_ms, retry_after_ms, fits}
-- Returns {-1, now_ms} without touching anything when it runs past the deadline: the caller has given
-- up on it (a frozen Redis resuming with a backlog), and an admission nobody waits for must not take
-- a slot or a reservation that nobody will release.
if ARGV[2] ~= '' and now > tonumber(ARGV[2]) then
  return {-1, now}
end
local rid = ARGV[3]
local t = words(ARGV[4])
local q = words(ARGV[5])
local lease, ticket_ttl, tokens, cost = tonumber(q[1]), tonumber(q[2]), tonumber(q[3]), tonumber(q[4])
local min_ttl, nr, nc, nb = tonumber(t[1]), tonumber(t[2]), tonumber(t[3]), tonumber(t[4])
local a = 5
local fields = {'n', 'x'}
local rates, slots, budgets = {}, {}, {}
for i = 1, nr do
  rates[i] = {f = t[a], tok = t[a + 1] == '1', limit = tonumber(t[a + 2]), period = tonumber(t[a + 3]),
              capacity = tonumber(t[a + 4])}
  fields[#fields + 1] = t[a]
  a = a + 5
end
for j = 1, nc do
  local sid = t[a]
  slots[j] = {sid = sid, c = 'c|' .. sid, h = 'h|' .. sid .. '|' .. rid, limit = tonumber(t[a + 1])}
  fields[#fields + 1] = slots[j].c
  fields[#fields + 1] = slots[j].h
  a = a + 2
end
for j = 1, nb do
  local b = t[a]
  budgets[j] = {v = 'v|' .. b, r = 'r|' .. b .. '|' .. rid, tok = t[a + 1] == '1', limit = tonumber(t[a + 2]),
                ends = tonumber(t[a + 3])}
  fields[#fields + 1] = budgets[j].v
  fields[#fields + 1] = budgets[j].r
  a = a + 4
end
load(fields)
sweep_if_due()

local out = {0, now}
local all_ok = true
local function push(ok, remaining, reset, retry, fits)
  out[#out + 1] = ok
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
  out[#out + 1] = fits
end

-- Rates (GCRA, scaled: debt = (TAT - at) * limit; one unit of cost adds period_ms).
for i = 1, nr do
  local r = rates[i]
  local c = r.tok and tokens or 1
  local debt = gcra_debt(r.f, r.limit)
  local cap = r.capacity * r.period
  local want = debt + c * r.period
  if want <= cap then
    if c > 0 then r.new = want end
    push(1, math.floor((cap - want) / r.period), ceil_div(want, r.limit), 0, 1)
  else
    all_ok = false
    local remaining = math.floor((cap - debt) / r.period)
    if remaining < 0 then remaining = 0 end
    if c * r.period <= cap then
      push(0, remaining, ceil_div(debt, r.limit), ceil_div(want - cap, r.limit), 1)
    else
      push(0, remaining, ceil_div(debt, r.limit), 0, 0)
    end
  end
end

-- Concurrency: c| counts the live holders exactly (swept above when an expiry has passed).
for j = 1, nc do
  local s = slots[j]
  local used = tonumber(get(s.c)) or 0
  if used < s.limit then
    push(1, s.limit - used - 1, 0, 0, 1)
  else
    all_ok = false
    local retry = 0
    if s.limit > 0 then
      retry = 1000
      local n = tonumber(get('n'))
      -- Only when some lease ends within the hint is the earliest one of this scope worth finding.
      if n and n - now < retry then
        if not complete then sweep() end
        local prefix = 'h|' .. s.sid .. '|'
        for f, v in pairs(cur) do
          if string.sub(f, 1, #prefix) == prefix and get(f) then
            local e = tonumber(get(f))
            if e - now < retry then retry = e - now end
          end
        end
      end
    end
    local remaining = s.limit - used
    if remaining < 0 then remaining = 0 end
    push(0, remaining, 0, retry, s.limit > 0 and 1 or 0)
  end
end

-- Budgets: spent (its own hash, per window) + reserved (v| here) against the limit.
for j = 1, nb do
  local b = budgets[j]
  local amount = b.tok and tokens or cost
  b.amount = amount
  local spent = tonumber(redis.call('HGET', KEYS[1 + j], 's')) or 0
  local left = b.limit - spent - (tonumber(get(b.v)) or 0)
  local fits = amount <= b.limit and 1 or 0
  local reset = b.ends - now
  if amount <= left then
    push(1, left - amount, reset, 0, fits)
  else
    all_ok = false
    push(0, left, reset, reset, fits)
  end
end

if not all_ok then
  flush()  -- only what a sweep cleaned
  return out
end

-- Every check passed: consume all of them.
for i = 1, nr do
  local r = rates[i]
  if r.new then put(r.f, gcra_value(r.new, r.limit, min_ttl)) end
end
local until_ms = now + lease
for j = 1, nc do
  local s = slots[j]
  local held = get(s.h)
  if held then
    put(s.h, int(math.max(tonumber(held), until_ms)))
  else
    put(s.h, int(until_ms))
    put(s.c, int((tonumber(get(s.c)) or 0) + 1))
  end
  note_expiry(until_ms)
  keep(until_ms)
end
for j = 1, nb do
  local b = budgets[j]
  -- Admitting the same request id twice must not reserve twice.
  if b.amount > 0 and not get(b.r) then
    put(b.r, int(b.amount) .. ' ' .. int(until_ms))
    put(b.v, int((tonumber(get(b.v)) or 0) + b.amount))
    note_expiry(until_ms)
    keep(until_ms)
  end
end
if ticket_ttl > 0 then
  put('t|' .. rid, int(now + ticket_ttl))
  note_expiry(now + ticket_ttl)
  keep(now + ticket_ttl)
end
flush()
out[1] = 1
return out
