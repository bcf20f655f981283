-- Append a batch of one tenant's usage records for one day, each exactly once, and add the new ones to
-- the day's aggregates: one HMGET and one HSET for the markers, one XADD per new record, one HMGET and
-- one HSET for the aggregates (summed per distinct field here, in Lua), whatever the batch size.
-- KEYS[1] the tenant's stream, KEYS[2] the tenant's day hash (aggregates), KEYS[3] the tenant's day
-- markers hash (one field per record written: `<request id>|<attempt>`)
-- ARGV: 1 marker TTL s, 2 aggregate and stream TTL s, 3 stream max length,
--       then 15 per record: marker field, JSON, then the 9 metrics: requests (1 for the final attempt, else 0),
--       prompt tokens, completion tokens, cost micro-USD, cache hits (1 or 0), tokens saved, cached (cache
--       read) tokens, cache write tokens, reasoning tokens; then route, model, deployment, key id.
-- Both hashes carry a `~` field from their creation on: its absence says the hash is new and needs its
-- TTL (set once, so a batch needs no EXPIRE). Numbers stay far below 2^53 (Lua doubles are exact).
-- Returns how many records were new.
local marker_ttl, agg_ttl, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local dims = {'route', 'model', 'deployment', 'key'}
local metrics = {'requests', 'prompt', 'completion', 'cost', 'hits', 'saved', 'cached', 'cache_write', 'reasoning'}
local per = 2 + #metrics + #dims
local n = (#ARGV - 3) / per
local marks = {'~'}
for i = 1, n do
  marks[i + 1] = ARGV[3 + (i - 1) * per + 1]
end
local seen = redis.call('HMGET', KEYS[3], unpack(marks))
local written, new_marks = {}, {}
-- A batch's records mostly share their route, model, deployment and key: each distinct combination sums
-- its records' metrics as numbers, and its field names are built once, after the loop.
local groups, group_order = {}, {}
local new = 0
local dim0 = 2 + #metrics
for i = 1, n do
  local a = 3 + (i - 1) * per
  local mark = ARGV[a + 1]
  if not seen[i + 1] and not written[mark] then
    written[mark] = true
    new = new + 1
    new_marks[#new_marks + 1] = mark
    new_marks[#new_marks + 1] = '1'
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'r', ARGV[a + 2])
    -- Each value prefixed with its length: names may hold any character, and two combinations never join
    -- into the same string.
    local r, mo, de, k = ARGV[a + dim0 + 1], ARGV[a + dim0 + 2], ARGV[a + dim0 + 3], ARGV[a + dim0 + 4]
    local combo = #r .. ':' .. r .. #mo .. ':' .. mo .. #de .. ':' .. de .. #k .. ':' .. k
    local g = groups[combo]
    if g == nil then
      g = {at = a, sums = {0, 0, 0, 0, 0, 0, 0, 0, 0}}
      groups[combo] = g
      group_order[#group_order + 1] = combo
    end
    local sums = g.sums
    for m = 1, #metrics do
      sums[m] = sums[m] + tonumber(ARGV[a + 2 + m])
    end
  end
end
local sums, order = {}, {}
for _, combo in ipairs(group_order) do
  local g = groups[combo]
  for d = 1, 4 do
    local base = dims[d] .. '|' .. ARGV[g.at + dim0 + d] .. '|'
    for m = 1, #metrics do
      local amount = g.sums[m]
      -- `requests` even when 0 (a failed attempt): the row exists, as in the in-process ledger. Amounts
      -- are never negative, so a sum of 0 is records of 0 only.
      if amount ~= 0 or m == 1 then
        local field = base .. metrics[m]
        if sums[field] == nil then
          sums[field] = 0
          order[#order + 1] = field
        end
        sums[field] = sums[field] + amount
      end
    end
  end
end
if new == 0 then
  return 0
end
if not seen[1] then
  new_marks[#new_marks + 1] = '~'
  new_marks[#new_marks + 1] = '1'
end
redis.call('HSET', KEYS[3], unpack(new_marks))
if not seen[1] then
  redis.call('EXPIRE', KEYS[3], marker_ttl)
end
order[#order + 1] = '~'
local current = redis.call('HMGET', KEYS[2], unpack(order))
local sets = {}
for i = 1, #order - 1 do
  local field = order[i]
  sets[#sets + 1] = field
  sets[#sets + 1] = string.format('%d', (tonumber(current[i]) or 0) + sums[field])
end
local fresh = not current[#order]
if fresh then
  sets[#sets + 1] = '~'
  sets[#sets + 1] = '1'
end
if #sets > 0 then
  redis.call('HSET', KEYS[2], unpack(sets))
end
if fresh then
  -- A new day of this tenant: the stream's TTL is renewed with it (at least daily while in use).
  redis.call('EXPIRE', KEYS[2], agg_ttl)
  redis.call('EXPIRE', KEYS[1], agg_ttl)
end
return new
