-- Shared by every script (prepended when the scripts are loaded): the clock, and the tenant's state
-- hash KEYS[1] (layout: gateway/state/layout.py) read with one HMGET and written with one HSET and one
-- HDEL, whatever the number of limits and tickets.
-- ARGV[1]: now_ms, or '' to use the Redis clock (TIME), so every replica shares one clock.
--
-- All numbers stay below 2^52 (validated by the caller), so Lua's doubles are exact integers here.
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local S = KEYS[1]
-- The hash's TTL grows by at least this much when it must grow, so most calls need no PEXPIRE.
local TTL_SLACK_MS = 60000

local function int(x)
  return string.format('%d', x)
end

local function words(s)
  local out = {}
  for w in string.gmatch(s, '%S+') do
    out[#out + 1] = w
  end
  return out
end

local function ceil_div(x, y)
  return math.floor((x + y - 1) / y)
end

-- cur: fields as read (false: absent); complete: cur holds the whole hash (after a sweep).
-- dirty: fields to write (a string) or delete (false), in first-touched order.
local cur, complete = {}, false
local dirty, order = {}, {}
local keep_until = 0

local function get(f)
  local d = dirty[f]
  if d ~= nil then
    return d
  end
  local v = cur[f]
  if v == nil then
    if complete then
      return false
    end
    error('strait: field read before it was loaded: ' .. f)
  end
  return v
end

local function put(f, v)
  if dirty[f] == nil then
    order[#order + 1] = f
  end
  dirty[f] = v
end

-- A field written now must survive until `e` (the hash's TTL is raised to cover it at flush).
local function keep(e)
  if e > keep_until then
    keep_until = e
  end
end

-- An h|, r| or t| field now expires at `e`: `n` must not be later.
local function note_expiry(e)
  local n = tonumber(get('n'))
  if not n or e < n then
    put('n', int(e))
  end
end

local function load(fields)
  local vals = redis.call('HMGET', S, unpack(fields))
  for i = 1, #fields do
    cur[fields[i]] = vals[i]
  end
end

-- Once `n` has passed: read the whole hash, drop expired slots, reservations, tickets and GCRA states,
-- recount every c| and v| from the live entries, and set `n` to the earliest remaining expiry.
local function sweep()
  local all = redis.call('HGETALL', S)
  cur, complete = {}, true
  local live_c, live_v = {}, {}
  local nxt = nil
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    cur[f] = v
    local kind = string.sub(f, 1, 2)
    if kind == 'h|' then
      local e = tonumber(v)
      if e <= now then
        put(f, false)
      else
        local sid = string.match(f, '^h|(.*)|[^|]*$')
        live_c[sid] = (live_c[sid] or 0) + 1
        if not nxt or e < nxt then nxt = e end
      end
    elseif kind == 'r|' then
      local a, e = string.match(v, '^(%d+) (%d+)$')
      e = tonumber(e)
      if e <= now then
        put(f, false)
      else
        local b = string.match(f, '^r|(.*)|[^|]*$')
        live_v[b] = (live_v[b] or 0) + tonumber(a)
        if not nxt or e < nxt then nxt = e end
      end
    elseif kind == 't|' then
      local e = tonumber(v)
      if e <= now then
        put(f, false)
      elseif not nxt or e < nxt then
        nxt = e
      end
    elseif kind == 'g|' then
      local e = tonumber(string.match(v, ' (%d+)$'))
      if e <= now then put(f, false) end
    end
  end
  for i = 1, #all, 2 do
    local f = all[i]
    local kind = string.sub(f, 1, 2)
    if (kind == 'c|' and not live_c[string.sub(f, 3)]) or (kind == 'v|' and not live_v[string.sub(f, 3)]) then
      put(f, false)
    end
  end
  for sid, c in pairs(live_c) do
    if tonumber(cur['c|' .. sid]) ~= c then put('c|' .. sid, int(c)) end
  end
  for b, a in pairs(live_v) do
    if tonumber(cur['v|' .. b]) ~= a then put('v|' .. b, int(a)) end
  end
  if nxt then
    put('n', int(nxt))
  elseif cur['n'] then
    put('n', false)
  end
end

local function sweep_if_due()
  local n = tonumber(get('n'))
  if n and n <= now then
    sweep()
  end
end

-- A GCRA state as MemoryStore sees it: the outstanding debt at `now` (0 when absent or expired), and
-- whether the field exists at all.
local function gcra_debt(f, limit)
  local v = get(f)
  if not v then
    return 0, false
  end
  local d, at, e = string.match(v, '^(%d+) (%d+) (%d+)$')
  if tonumber(e) <= now then
    return 0, true
  end
  local debt = tonumber(d) - (now - tonumber(at)) * limit
  if debt < 0 then debt = 0 end
  return debt, true
end

local function gcra_value(debt, limit, min_ttl)
  local e = now + ceil_div(debt, limit) + min_ttl
  keep(e)
  return int(debt) .. ' ' .. int(now) .. ' ' .. int(e)
end

-- Write what changed: one HDEL, one HSET, and a PEXPIRE only when the hash must live longer than the
-- expiry it last got (`x`), then with some slack.
local function flush()
  local sets, dels = {}, {}
  for _, f in ipairs(order) do
    local v = dirty[f]
    if v then
      sets[#sets + 1] = f
      sets[#sets + 1] = v
    else
      dels[#dels + 1] = f
    end
  end
  if #dels > 0 then
    redis.call('HDEL', S, unpack(dels))
  end
  if #sets > 0 then
    local x = tonumber(get('x')) or 0
    local ttl = nil
    if x <= now or keep_until > x then
      local nx = math.max(keep_until, now) + TTL_SLACK_MS
      sets[#sets + 1] = 'x'
      sets[#sets + 1] = int(nx)
      ttl = nx - now
    end
    redis.call('HSET', S, unpack(sets))
    if ttl then
      redis.call('PEXPIRE', S, ttl)
    end
  end
end
