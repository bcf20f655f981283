-- Shared by every script (prepended when the scripts are loaded): the clock, the request id and the
-- integer arguments.
-- ARGV: [1] now_ms, or '' to use the Redis clock (TIME), so every replica shares one clock
--       [2] request id
--       [3] space-separated integers (one argument is far cheaper to send than dozens)
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local rid = ARGV[2]
local n = {}
for x in string.gmatch(ARGV[3], '%-?%d+') do
  n[#n + 1] = tonumber(x)
end
