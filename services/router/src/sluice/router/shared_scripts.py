"""The Lua scripts behind :mod:`sluice.router.shared_state`, one key per target.

A target's hash (``<prefix>:target:{<name>}``, hash-tagged so a cluster keeps it in one
slot) holds, per circuit (``*`` for the provider, else an intent kind):

* ``<c>:state`` 0 closed or 1 open, ``<c>:opened`` when it opened (ms, Redis clock),
  ``<c>:probe`` until when the current half-open probe is taken, ``<c>:prober`` by which
  router, ``<c>:good`` the good probes in a row;
* ``<c>@<slot>`` buckets of ``span`` seconds of samples, ``"bucket good total batches
  latency_ms"`` (``bucket`` is the Unix time divided by ``span``), in a ring of ``buckets``
  slots; a few wide buckets, not one a second, keep the window sums cheap to read;

and for the outage clock ``out:since`` (when the target was first seen down) and
``out:probe`` (until when the current outage probe is taken). Every time is Redis's own
(``TIME``), so routers on different machines agree on it.
"""

from __future__ import annotations

__all__ = ["DOWN", "ROUTERS", "SYNC", "UP"]

# KEYS[1] a target's hash. ARGV: router id, cool-down ms, probe-every ms, threshold,
# max latency ms, min samples, window (batches), buckets, span (seconds per bucket),
# close-after, ttl ms,
# outage probe ms (0: do not take the outage probe); then 6 per circuit: name, claim (1:
# take its half-open probe when free), good, failed, batches, latency ms (samples since
# the last sync). Returns {now ms, out since ms or -1, outage probe taken 0/1,
# then per circuit: status (0 closed, 1 open, 2 half-open and probed by someone else or
# not asked for, 3 half-open and this call took the probe), event (0, 1 opened, 2 closed)}.
SYNC = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local cooldown, probe_every = tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, max_latency = tonumber(ARGV[4]), tonumber(ARGV[5])
local min_samples, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local buckets, span = tonumber(ARGV[8]), tonumber(ARGV[9])
local close_after, ttl, outage_probe = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local sec = math.floor(tonumber(t[1]) / span)  -- the current bucket
local wrote = false
local pattern = '(%d+) (%d+) (%d+) (%d+) (%d+)'

local function slots(name)
  local fields = {}
  for i = 0, buckets - 1 do fields[#fields + 1] = name .. '@' .. i end
  return fields
end

local function open(name)
  redis.call('HSET', key, name .. ':state', 1, name .. ':opened', now,
             name .. ':probe', 0, name .. ':good', 0)
  redis.call('HDEL', key, unpack(slots(name)))
end

local function add(name, good, total, batches, latency)
  local slot = name .. '@' .. (sec % buckets)
  local g, n, b, l = 0, 0, 0, 0
  local cur = redis.call('HGET', key, slot)
  if cur then
    local s, cg, cn, cb, cl = string.match(cur, pattern)
    if tonumber(s) == sec then
      g, n, b, l = tonumber(cg), tonumber(cn), tonumber(cb), tonumber(cl)
    end
  end
  redis.call('HSET', key, slot, string.format('%d %d %d %d %d', sec, g + good, n + total,
                                               b + batches, l + latency))
end

-- the newest of the last `buckets` buckets, back to `window` batches
local function sums(name)
  local rows = {}
  for _, v in ipairs(redis.call('HMGET', key, unpack(slots(name)))) do
    if v then
      local s, g, n, b, l = string.match(v, pattern)
      s = tonumber(s)
      if s > sec - buckets then
        rows[#rows + 1] = {s, tonumber(g), tonumber(n), tonumber(b), tonumber(l)}
      end
    end
  end
  table.sort(rows, function(x, y) return x[1] > y[1] end)
  local g, n, b, l = 0, 0, 0, 0
  for _, r in ipairs(rows) do
    g, n, b, l = g + r[2], n + r[3], b + r[4], l + r[5]
    if b >= window then break end
  end
  return g, n, b, l
end

local out = {now, -1, 0}
local since = redis.call('HGET', key, 'out:since')
if since then
  out[2] = tonumber(since)
  if outage_probe > 0 and now >= tonumber(redis.call('HGET', key, 'out:probe') or '0') then
    redis.call('HSET', key, 'out:probe', now + outage_probe)
    out[3] = 1
    wrote = true
  end
end

for i = 13, #ARGV, 6 do
  local name, claim = ARGV[i], ARGV[i + 1]
  local good, failed = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local batches, latency = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local st = redis.call('HMGET', key, name .. ':state', name .. ':opened', name .. ':probe')
  local state, opened = tonumber(st[1] or '0'), tonumber(st[2] or '0')
  local probe = tonumber(st[3] or '0')
  local event = 0
  if good + failed > 0 then
    wrote = true
    if state == 0 then
      add(name, good, good + failed, batches, latency)
      local g, n, b, l = sums(name)
      if n >= min_samples and (g / n < threshold or l / b > max_latency) then
        open(name)
        state, opened, probe, event = 1, now, 0, 1
      end
    elseif now - opened >= cooldown then
      -- half-open: what the probes sent since the last sync decides
      if failed == 0 and latency / batches <= max_latency then
        if redis.call('HINCRBY', key, name .. ':good', 1) >= close_after then
          redis.call('HSET', key, name .. ':state', 0, name .. ':good', 0, name .. ':probe', 0)
          redis.call('HDEL', key, unpack(slots(name)))
          state, event = 0, 2
        end
      else
        open(name)
        state, opened, probe, event = 1, now, 0, 1
      end
    end -- open and cooling down: late results of batches sent before it opened
  end
  local status = 0
  if state == 1 then
    if now - opened < cooldown then
      status = 1
    elseif claim == '1' and now >= probe then
      redis.call('HSET', key, name .. ':probe', now + probe_every, name .. ':prober', me)
      status, wrote = 3, true
    else
      status = 2
    end
  end
  out[#out + 1] = status
  out[#out + 1] = event
end
if wrote then redis.call('PEXPIRE', key, ttl) end
return out
"""

# KEYS[1] a target's hash; ARGV[1] ttl ms. Notes the target down (keeping the first time
# any router saw it); returns {now ms, down since ms}.
DOWN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSETNX', KEYS[1], 'out:since', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {now, tonumber(redis.call('HGET', KEYS[1], 'out:since'))}
"""

# KEYS[1] a target's hash. Notes the target up; returns 1 when it was down until now (the
# caller, and only it, releases what was held for it).
UP = """
local was = redis.call('HDEL', KEYS[1], 'out:since')
redis.call('HDEL', KEYS[1], 'out:probe')
return was
"""

# KEYS[1] the routers' sorted set; ARGV: router id, how long (ms) a router counts without
# being heard from. Returns how many routers were heard from within that time.
ROUTERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local alive = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - alive)
redis.call('PEXPIRE', KEYS[1], alive * 2)
return redis.call('ZCARD', KEYS[1])
"""
