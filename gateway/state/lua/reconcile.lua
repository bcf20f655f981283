-- Reconcile: book what requests actually used, each once. Mirrors MemoryStore.reconcile_now, applied
-- ticket after ticket at one `now` (a batch equals the same reconciles one by one).
--
-- KEYS: [1] the tenant's state hash, [2..] budget counter hashes {s: spent} the tickets refer to
-- ARGV: [1] now_ms or '' (TIME)  [2] m: how many settle templates follow  [3 .. 2 + m] templates (layout.py)
--       then one per ticket: "template_index rid delta_tokens actual_tokens actual_cost budget_key_index..."
--       (delta: actual - reserved tokens; budget_key_index: the KEYS index of each budget's counter)
-- Returns {now_ms, applied (1|0) per ticket}. The ticket field makes it idempotent: only the call that
-- deletes a live ticket books.
local m = tonumber(ARGV[2])
local templates = {}
for i = 1, m do
  local t = words(ARGV[2 + i])
  local nt, nc, nb = tonumber(t[2]), tonumber(t[3]), tonumber(t[4])
  local a = 5
  local tpl = {min_ttl = tonumber(t[1]), rates = {}, sids = {}, budgets = {}}
  for k = 1, nt do
    tpl.rates[k] = {f = t[a], limit = tonumber(t[a + 1]), period = tonumber(t[a + 2])}
    a = a + 3
  end
  for k = 1, nc do
    tpl.sids[k] = t[a]
    a = a + 1
  end
  for k = 1, nb do
    tpl.budgets[k] = {b = t[a], tok = t[a + 1] == '1', grace_end = tonumber(t[a + 2])}
    a = a + 3
  end
  templates[i] = tpl
end

local tickets = {}
local fields = {'n', 'x'}
for k = 3 + m, #ARGV do
  local w = words(ARGV[k])
  local tpl = templates[tonumber(w[1])]
  local rid = w[2]
  local tk = {tpl = tpl, rid = rid, t = 't|' .. rid, delta = tonumber(w[3]), tokens = tonumber(w[4]),
              cost = tonumber(w[5]), bkeys = {}}
  fields[#fields + 1] = tk.t
  for _, r in ipairs(tpl.rates) do fields[#fields + 1] = r.f end
  for _, sid in ipairs(tpl.sids) do
    fields[#fields + 1] = 'c|' .. sid
    fields[#fields + 1] = 'h|' .. sid .. '|' .. rid
  end
  for j, b in ipairs(tpl.budgets) do
    fields[#fields + 1] = 'v|' .. b.b
    fields[#fields + 1] = 'r|' .. b.b .. '|' .. rid
    tk.bkeys[j] = tonumber(w[5 + j])
  end
  tickets[#tickets + 1] = tk
end
load(fields)
sweep_if_due()

local out = {now}
local spent, grace = {}, {}
for _, tk in ipairs(tickets) do
  local tpl, rid = tk.tpl, tk.rid
  local expiry = get(tk.t)
  local live = expiry and tonumber(expiry) > now
  if expiry then put(tk.t, false) end
  -- Releasing a slot is idempotent, so do it even for a duplicate or expired ticket.
  for _, sid in ipairs(tpl.sids) do
    local h = 'h|' .. sid .. '|' .. rid
    if get(h) then
      put(h, false)
      local c = (tonumber(get('c|' .. sid)) or 1) - 1
      put('c|' .. sid, c > 0 and int(c) or false)
    end
  end
  if live then
    if tk.delta ~= 0 then
      for _, r in ipairs(tpl.rates) do
        local debt, exists = gcra_debt(r.f, r.limit)
        debt = debt + tk.delta * r.period
        if debt > 0 then
          put(r.f, gcra_value(debt, r.limit, tpl.min_ttl))
        elseif exists then
          put(r.f, false)
        end
      end
    end
    for j, b in ipairs(tpl.budgets) do
      local rf = 'r|' .. b.b .. '|' .. rid
      local held = get(rf)
      if held then
        put(rf, false)
        local left = (tonumber(get('v|' .. b.b)) or 0) - tonumber(string.match(held, '^(%d+)'))
        put('v|' .. b.b, left > 0 and int(left) or false)
      end
      local actual = b.tok and tk.tokens or tk.cost
      -- A window whose grace has passed is gone (MemoryStore drops it the same way).
      if actual > 0 and b.grace_end > now then
        local key = tk.bkeys[j]
        spent[key] = (spent[key] or 0) + actual
        grace[key] = b.grace_end
      end
    end
  end
  out[#out + 1] = live and 1 or 0
end
flush()
for key, amount in pairs(spent) do
  -- The counter exists from the first spend of its window on, with the window's TTL from then.
  if redis.call('HINCRBY', KEYS[key], 's', amount) == amount then
    redis.call('PEXPIRE', KEYS[key], grace[key] - now)
  end
end
return out
