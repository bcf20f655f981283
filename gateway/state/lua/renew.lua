-- Renew: extend a long request's lease (slots, budget reservations, ticket). Mirrors MemoryStore.renew_now.
--
-- KEYS: [1] the tenant's state hash
-- ARGV: [1] now_ms or '' (TIME)  [2] the binding's settle template (layout.py)  [3] request id (encoded)
--       [4] lease_ms ticket_ttl_ms
-- Returns 1, or 0 when the ticket is gone (reconciled, or expired).
local t = words(ARGV[2])
local rid = ARGV[3]
local q = words(ARGV[4])
local lease, ticket_ttl = tonumber(q[1]), tonumber(q[2])
local nt, nc, nb = tonumber(t[2]), tonumber(t[3]), tonumber(t[4])
local a = 5 + 3 * nt
local hs, rs = {}, {}
local tf = 't|' .. rid
local fields = {'n', 'x', tf}
for k = 1, nc do
  hs[k] = 'h|' .. t[a] .. '|' .. rid
  fields[#fields + 1] = hs[k]
  a = a + 1
end
for k = 1, nb do
  rs[k] = 'r|' .. t[a] .. '|' .. rid
  fields[#fields + 1] = rs[k]
  a = a + 3
end
load(fields)
sweep_if_due()
local expiry = tonumber(get(tf))
if not expiry or expiry <= now then
  flush()
  return 0
end
local ticket_until = math.max(expiry, now + ticket_ttl)
put(tf, int(ticket_until))
keep(ticket_until)
local until_ms = now + lease
-- Only what is still held: a released or expired slot or reservation is never re-created.
for _, h in ipairs(hs) do
  local e = get(h)
  if e then
    put(h, int(math.max(tonumber(e), until_ms)))
    keep(until_ms)
  end
end
for _, r in ipairs(rs) do
  local v = get(r)
  if v then
    local amount, e = string.match(v, '^(%d+) (%d+)$')
    put(r, amount .. ' ' .. int(math.max(tonumber(e), until_ms)))
    keep(until_ms)
  end
end
flush()
return 1
