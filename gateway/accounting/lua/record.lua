-- Append a batch of one tenant's usage records for one day, each exactly once, and add the new ones to
-- the day's aggregates with one HINCRBY per distinct field (not one per record and field: a batch of 25
-- records of one route, model, deployment and key is 16 HINCRBYs, where it was 400).
-- KEYS[1] the tenant's stream, KEYS[2] the tenant's day hash, KEYS[2 + i] record i's marker
-- ARGV: 1 marker TTL s, 2 aggregate and stream TTL s, 3 stream max length,
--       then 9 per record: JSON, requests (1 for the final attempt, else 0), prompt tokens,
--       completion tokens, cost micro-USD, route, model, deployment, key id.
-- Returns how many records were new.
local marker_ttl, agg_ttl, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local dims = {'route', 'model', 'deployment', 'key'}
local metrics = {'requests', 'prompt', 'completion', 'cost'}
local sums, order = {}, {}
local new = 0
local n = (#ARGV - 3) / 9
for i = 1, n do
  local a = 3 + (i - 1) * 9
  if redis.call('SET', KEYS[2 + i], '1', 'NX', 'EX', marker_ttl) then
    new = new + 1
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'r', ARGV[a + 1])
    for d = 1, 4 do
      local base = dims[d] .. '|' .. ARGV[a + 5 + d] .. '|'
      for m = 1, 4 do
        local amount = tonumber(ARGV[a + 1 + m])
        if amount ~= 0 then
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
end
if new > 0 then
  for _, field in ipairs(order) do
    redis.call('HINCRBY', KEYS[2], field, sums[field])
  end
  redis.call('EXPIRE', KEYS[1], agg_ttl)
  redis.call('EXPIRE', KEYS[2], agg_ttl)
end
return new
