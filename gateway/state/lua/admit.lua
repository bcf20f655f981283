-- Admission: every check of one request in one round trip, all-or-nothing. Mirrors gcra.py and
-- MemoryStore.admit_now; keep the three in step (the model test compares them).
--
-- KEYS: rate keys (nr), slot zsets (nc), budget hashes (nb), reservation zsets (nb), ticket
-- ARGV: [1] now_ms, or '' to use the Redis clock (TIME), so every replica shares one clock
--       [2] request id
--       [3] space-separated integers (one argument is far cheaper to send than dozens):
--           lease_ms min_ttl_ms ticket_ttl_ms(0: no ticket) nr nc nb,
--           then per rate: limit period_ms capacity cost; per slot zset: limit;
--           per budget: limit amount reset_ms(until the window ends) ttl_ms(window end + grace)
-- Returns {allowed, now_ms, then 5 integers per check: allowed, remaining, reset_ms, retry_after_ms, fits}
--
-- All numbers stay below 2^52 (validated by the caller), so Lua's doubles are exact integers here.
--       [4] deadline: the latest Redis time (ms) at which the caller still waits for this answer, or ''
-- Returns {-1, now_ms} without touching anything when it runs past the deadline: the caller has given
-- up on it (a frozen Redis resuming with a backlog), and an admission nobody waits for must not take
-- a slot or a reservation that nobody will release.
-- (now, rid and the integers n[] come from prelude.lua)
if ARGV[4] ~= nil and ARGV[4] ~= '' and now > tonumber(ARGV[4]) then
  return {-1, now}
end
local lease, min_ttl, ticket_ttl, nr, nc, nb = n[1], n[2], n[3], n[4], n[5], n[6]
local a = 7
local out = {0, now}
local all_ok = true

local function ceil_div(x, y)
  return math.floor((x + y - 1) / y)
end

local function push(ok, remaining, reset, retry, fits)
  out[#out + 1] = ok
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
  out[#out + 1] = fits
end

-- Rates (GCRA, scaled: debt = (TAT - at) * limit; one unit of cost adds period_ms).
local rate_new, rate_limit = {}, {}
for i = 1, nr do
  local limit, period, capacity, cost = n[a], n[a + 1], n[a + 2], n[a + 3]
  a = a + 4
  local debt = 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local d, at = string.match(v, '^(%d+) (%d+)$')
    debt = tonumber(d) - (now - tonumber(at)) * limit
    if debt < 0 then debt = 0 end
  end
  local cap = capacity * period
  local want = debt + cost * period
  if want <= cap then
    if cost > 0 then
      rate_new[i] = want
      rate_limit[i] = limit
    end
    push(1, math.floor((cap - want) / period), ceil_div(want, limit), 0, 1)
  else
    all_ok = false
    local remaining = math.floor((cap - debt) / period)
    if remaining < 0 then remaining = 0 end
    if cost * period <= cap then
      push(0, remaining, ceil_div(debt, limit), ceil_div(want - cap, limit), 1)
    else
      push(0, remaining, ceil_div(debt, limit), 0, 0)
    end
  end
end

-- Concurrency: a zset of request id -> lease expiry; expired members (dead replicas' orphans) drop out.
for j = 1, nc do
  local k = KEYS[nr + j]
  local limit = n[a]
  a = a + 1
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local used = redis.call('ZCARD', k)
  if used < limit then
    push(1, limit - used - 1, 0, 0, 1)
  else
    all_ok = false
    local retry = 0
    if limit > 0 then
      retry = 1000
      local first = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
      if first[2] and tonumber(first[2]) - now < retry then retry = tonumber(first[2]) - now end
    end
    local remaining = limit - used
    if remaining < 0 then remaining = 0 end
    push(0, remaining, 0, retry, limit > 0 and 1 or 0)
  end
end

-- Budgets: hash {spent, rsv}; reservations "<id> <amount>" -> expiry, expired ones are given back.
local hb, zb = nr + nc, nr + nc + nb
local budget_amount, budget_ttl = {}, {}
for j = 1, nb do
  local h, z = KEYS[hb + j], KEYS[zb + j]
  local limit, amount, reset, ttl = n[a], n[a + 1], n[a + 2], n[a + 3]
  a = a + 4
  budget_amount[j] = amount
  budget_ttl[j] = ttl
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 64)
  if #expired > 0 then
    local freed = 0
    for _, m in ipairs(expired) do
      freed = freed + tonumber(string.match(m, ' (%d+)$'))
    end
    redis.call('ZREM', z, unpack(expired))
    if redis.call('EXISTS', h) == 1 then
      redis.call('HINCRBY', h, 'rsv', -freed)
    end
  end
  local vals = redis.call('HMGET', h, 'spent', 'rsv')
  local left = limit - (tonumber(vals[1]) or 0) - (tonumber(vals[2]) or 0)
  local fits = amount <= limit and 1 or 0
  if amount <= left then
    push(1, left - amount, reset, 0, fits)
  else
    all_ok = false
    push(0, left, reset, reset, fits)
  end
end

if not all_ok then
  return out
end

-- Every check passed: consume all of them. Every key written gets its TTL in this same call.
for i = 1, nr do
  local d = rate_new[i]
  if d then
    redis.call('SET', KEYS[i], string.format('%d %d', d, now), 'PX', ceil_div(d, rate_limit[i]) + min_ttl)
  end
end
for j = 1, nc do
  local k = KEYS[nr + j]
  redis.call('ZADD', k, string.format('%d', now + lease), rid)
  if redis.call('PTTL', k) < lease then
    redis.call('PEXPIRE', k, lease)
  end
end
for j = 1, nb do
  local amount = budget_amount[j]
  if amount > 0 then
    local h, z = KEYS[hb + j], KEYS[zb + j]
    local amount_s = string.format('%d', amount)
    -- NX: admitting the same request id twice must not reserve twice.
    if redis.call('ZADD', z, 'NX', string.format('%d', now + lease), rid .. ' ' .. amount_s) == 1 then
      redis.call('HINCRBY', h, 'rsv', amount_s)
    end
    redis.call('PEXPIRE', h, budget_ttl[j])
    redis.call('PEXPIRE', z, budget_ttl[j])
  end
end
if ticket_ttl > 0 then
  redis.call('SET', KEYS[nr + nc + 2 * nb + 1], '1', 'PX', ticket_ttl)
end
out[1] = 1
return out
