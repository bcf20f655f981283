-- Renew: extend a long request's lease (slots, budget reservations, ticket). Mirrors MemoryStore.renew_now.
--
-- KEYS: ticket, slot zsets (nc), reservation zsets (nb)
-- ARGV: [1] now_ms or '' (TIME)  [2] request id
--       [3] space-separated integers: lease_ms ticket_ttl_ms nc nb, then per budget: reserved amount
-- Returns 1, or 0 when the ticket is gone (reconciled, or expired with its reservations).
-- (now, rid and the integers n[] come from prelude.lua)
local lease, new_ttl, nc, nb = n[1], n[2], n[3], n[4]
local ticket_ttl = redis.call('PTTL', KEYS[1])
if ticket_ttl < 0 then
  return 0
end
if ticket_ttl < new_ttl then
  redis.call('PEXPIRE', KEYS[1], new_ttl)
end
local until_s = string.format('%d', now + lease)
for j = 1, nc do
  local k = KEYS[1 + j]
  -- XX: never re-create a slot that was already released or expired; GT: never shorten a lease.
  redis.call('ZADD', k, 'XX', 'GT', until_s, rid)
  if redis.call('PTTL', k) < lease then
    redis.call('PEXPIRE', k, lease)
  end
end
for j = 1, nb do
  local reserved = n[4 + j]
  if reserved > 0 then
    redis.call('ZADD', KEYS[1 + nc + j], 'XX', 'GT', until_s, rid .. ' ' .. string.format('%d', reserved))
  end
end
return 1
