-- Reconcile: book what a request actually used, once. Mirrors MemoryStore.reconcile_now.
--
-- KEYS: ticket, token-rate keys (nt), slot zsets (nc), budget hashes (nb), reservation zsets (nb)
-- ARGV: [1] now_ms or '' (TIME)  [2] request id
--       [3] space-separated integers: min_ttl_ms nt nc nb,
--           then per token rate: limit period_ms delta (actual - reserved tokens, may be negative);
--           per budget: reserved actual ttl_ms (to recreate an expired counter; <= 0: the window is gone)
-- Returns {applied, now_ms}. The ticket key makes it idempotent: only the call that deletes it books.
-- (now, rid and the integers n[] come from prelude.lua)
local min_ttl, nt, nc, nb = n[1], n[2], n[3], n[4]

local live = redis.call('DEL', KEYS[1]) == 1
-- Releasing a slot is idempotent, so do it even for a duplicate or expired ticket.
for j = 1, nc do
  redis.call('ZREM', KEYS[1 + nt + j], rid)
end
if not live then
  return {0, now}
end

local a = 5
for i = 1, nt do
  local k = KEYS[1 + i]
  local limit, period, delta = n[a], n[a + 1], n[a + 2]
  a = a + 3
  if delta ~= 0 then
    local debt = 0
    local v = redis.call('GET', k)
    if v then
      local d, at = string.match(v, '^(%d+) (%d+)$')
      debt = tonumber(d) - (now - tonumber(at)) * limit
      if debt < 0 then debt = 0 end
    end
    debt = debt + delta * period
    if debt > 0 then
      redis.call('SET', k, string.format('%d %d', debt, now), 'PX', math.floor((debt + limit - 1) / limit) + min_ttl)
    elseif v then
      redis.call('DEL', k)
    end
  end
end

local hb, zb = 1 + nt + nc, 1 + nt + nc + nb
for j = 1, nb do
  local h, z = KEYS[hb + j], KEYS[zb + j]
  local reserved, actual, ttl = n[a], n[a + 1], n[a + 2]
  a = a + 3
  local exists = redis.call('EXISTS', h) == 1
  if reserved > 0 and redis.call('ZREM', z, rid .. ' ' .. string.format('%d', reserved)) == 1 and exists then
    redis.call('HINCRBY', h, 'rsv', -reserved)
  end
  if actual > 0 then
    if exists then
      redis.call('HINCRBY', h, 'spent', actual)
    elseif ttl > 0 then
      redis.call('HINCRBY', h, 'spent', actual)
      redis.call('PEXPIRE', h, ttl)
    end
  end
end
return {1, now}
