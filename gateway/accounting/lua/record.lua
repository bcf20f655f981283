-- Append one usage record exactly once and add it to the day's aggregates.
-- KEYS[1] marker (request id + attempt), KEYS[2] the tenant's stream, KEYS[3] the tenant's day hash.
-- ARGV[1] marker TTL s, ARGV[2] aggregate and stream TTL s, ARGV[3] stream max length, ARGV[4] record JSON,
-- ARGV[5..] field, increment pairs for the day hash.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'r', ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
for i = 5, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], tonumber(ARGV[i + 1]))
end
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2]))
return 1
