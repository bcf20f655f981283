-- Append one usage record exactly once and add it to the day's aggregates.
-- KEYS[1] marker (request id + attempt), KEYS[2] the tenant's stream, KEYS[3] the tenant's day hash.
-- ARGV: 1 marker TTL s, 2 aggregate and stream TTL s, 3 stream max length, 4 record JSON,
--       5 requests (1 for the final attempt, else 0), 6 prompt tokens, 7 completion tokens, 8 cost micro-USD,
--       9.. the record's route, model, deployment and key id (one aggregate row each).
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'r', ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
local dims = {'route', 'model', 'deployment', 'key'}
local metrics = {'requests', 'prompt', 'completion', 'cost'}
for d = 1, 4 do
  local base = dims[d] .. '|' .. ARGV[8 + d] .. '|'
  for m = 1, 4 do
    local amount = tonumber(ARGV[4 + m])
    if amount ~= 0 then
      redis.call('HINCRBY', KEYS[3], base .. metrics[m], amount)
    end
  end
end
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2]))
return 1
